fn main() {
    println!("paude-proxy {}", env!("CARGO_PKG_VERSION"));
}
