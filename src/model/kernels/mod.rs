//! CPU kernels that candle lacks: multi-row quantized matrix products over tile-packed weights,
//! paged attention over per-sequence KV blocks, and the spinning thread pool they run on.

pub mod attention;
pub mod elementwise;
pub mod matmul;
pub mod packed;
pub mod pool;
pub mod simd;

pub use matmul::{Isa, matmul};
pub use packed::{PackedFormat, PackedMatrix};
