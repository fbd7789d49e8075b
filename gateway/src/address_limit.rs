//! A rate limit per client address, for requests that are not tied to a connection (the HTTP
//! history route): each address has its own budget. The table of addresses is bounded: past
//! [`ADDRESSES_MAX`] it forgets the addresses whose budget is full again.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::DefaultClock;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

/// Addresses tracked before the idle ones are forgotten.
const ADDRESSES_MAX: usize = 10_000;

/// Requests per second and burst, per client address.
pub struct AddressLimit {
    limiter: RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock>,
}

impl AddressLimit {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            limiter: RateLimiter::hashmap(quota),
        }
    }

    /// Whether one more request from `address` fits now (and counts it if so).
    pub fn allow(&self, address: IpAddr) -> bool {
        if self.limiter.len() > ADDRESSES_MAX {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&address).is_ok()
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_budget_and_the_table_stays_bounded() {
        let limit = AddressLimit::new(1, 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!((0..10).filter(|_| limit.allow(a)).count(), 3);
        assert!(limit.allow(b), "another address is not affected");
        for i in 0..3 * ADDRESSES_MAX as u32 {
            limit.allow(IpAddr::from(i.to_be_bytes()));
        }
        assert!(
            limit.len() <= ADDRESSES_MAX + 1,
            "{} addresses kept",
            limit.len()
        );
    }
}
