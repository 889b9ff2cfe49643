//! Reading weights from disk.

pub mod weights;
