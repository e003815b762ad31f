//! Herald server (being written).
pub mod auth;
pub mod config;
