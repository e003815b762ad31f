//! Rate limits (SPEC §9), each a `governor` limiter built once from config.
//!
//! Keyed limiters remember every key they have seen; [`Limiters::housekeep`] forgets keys
//! whose state is back to full, and runs once a minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitsConfig;

pub struct Limiters {
    subscribe: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    publish: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    ingest: Option<DefaultDirectRateLimiter>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

fn nz(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
}

impl Limiters {
    /// A limit of 0 disables that limiter.
    pub fn new(l: &LimitsConfig) -> Self {
        Self {
            subscribe: nz(l.subscribes_per_second)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
            publish: nz(l.client_publishes_per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            ingest: nz(l.ingest_per_second).map(|n| RateLimiter::direct(Quota::per_second(n))),
            per_ip: nz(l.connections_per_ip_per_second)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
        }
    }

    /// One subscribe request of `user`.
    pub fn subscribe(&self, user: &Arc<str>) -> bool {
        self.subscribe
            .as_ref()
            .is_none_or(|l| l.check_key(user).is_ok())
    }

    /// One client publish of `user`.
    pub fn client_publish(&self, user: &Arc<str>) -> bool {
        self.publish
            .as_ref()
            .is_none_or(|l| l.check_key(user).is_ok())
    }

    /// `n` messages through the server API (all or nothing).
    pub fn ingest(&self, n: u32) -> bool {
        let Some(l) = &self.ingest else { return true };
        match NonZeroU32::new(n) {
            None => true,
            Some(n) => matches!(l.check_n(n), Ok(Ok(()))),
        }
    }

    /// One WebSocket handshake from `ip`.
    pub fn connection(&self, ip: IpAddr) -> bool {
        self.per_ip
            .as_ref()
            .is_none_or(|l| l.check_key(&ip).is_ok())
    }

    /// Forget keys whose buckets are full again (bounded memory for keyed limiters).
    pub fn housekeep(&self) {
        if let Some(l) = &self.subscribe {
            l.retain_recent();
        }
        if let Some(l) = &self.publish {
            l.retain_recent();
        }
        if let Some(l) = &self.per_ip {
            l.retain_recent();
        }
    }
}
