fn main() {
    println!("paude-launch {}", env!("CARGO_PKG_VERSION"));
}
