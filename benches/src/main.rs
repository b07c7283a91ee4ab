fn main() {
    println!("paude-bench {}", env!("CARGO_PKG_VERSION"));
}
