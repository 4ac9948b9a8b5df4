//! Baton's product library: the workflow factory and the built-in ML pipelines that the
//! `baton` binary registers, runs and serves.

pub mod faults;
pub mod index;
pub mod pipelines;
pub mod replay_check;
