//! Integration tests against real nats-server and baton processes. One module per area.

mod chaos;
mod cluster;
mod crash;
mod edge;
mod finetune;
mod harness_smoke;
mod ingest;
mod mirror;
mod pipeline;
mod runtime;
mod semantics;
mod stages;
