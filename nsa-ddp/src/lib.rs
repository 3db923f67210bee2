//! `nsa-ddp`: data parallelism — NCCL process group, gradient buckets (size in MB), gradient
//! compression (none / bf16 / fp16), parameter broadcast, rendezvous, and an in-process backend
//! for tests.
//!
//! This crate is empty until the DDP issue lands; the workspace carries it now so that the crate
//! graph in ARCHITECTURE.md exists from the first commit.
#![forbid(unsafe_code)]
