//! The `scalecar` binary.

fn main() {
    println!("scalecar {}", env!("CARGO_PKG_VERSION"));
}
