//! CPU kernels that candle lacks: multi-row quantized matrix products over tile-packed weights,
//! paged attention over per-sequence KV blocks, and the spinning thread pool they run on.

// Register-blocked kernels index several fixed-size arrays (accumulators, row pointers) with the
// same loop counter; iterator chains would obscure which register holds what.
#![allow(clippy::needless_range_loop)]

pub mod attention;
pub mod elementwise;
pub mod matmul;
pub mod packed;
pub mod pool;

pub use matmul::{Isa, matmul};
pub use packed::{PackedFormat, PackedMatrix};
