//! Renewal keys made ahead of time: after a renewal takes its key, the next one is generated on
//! tokio's blocking pool, so the renewal itself (and the CA's clock on it) never waits for key
//! generation. One key is kept at most; it is in memory only, like the current key.

use std::sync::Mutex;

use rcgen::KeyPair;

/// The key the next renewal will use, once generated.
static NEXT: Mutex<Option<KeyPair>> = Mutex::new(None);

/// The key for the next CSR: the one made in the background since the last call, or a new one
/// now (the first call, or a call outside a tokio runtime). Either way the replacement is started
/// in the background.
pub(crate) fn next_key() -> Result<KeyPair, rcgen::Error> {
    let ready = NEXT.lock().unwrap_or_else(|p| p.into_inner()).take();
    let key = match ready {
        Some(key) => key,
        None => KeyPair::generate()?,
    };
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn_blocking(|| {
            if let Ok(key) = KeyPair::generate() {
                NEXT.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(key);
            }
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn every_call_gets_a_new_key_and_the_next_one_is_made_in_the_background() {
        let a = next_key().unwrap();
        // The replacement appears without another call.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while NEXT.lock().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "no key made ahead");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let b = next_key().unwrap();
        let c = next_key().unwrap();
        assert_ne!(a.public_key_raw(), b.public_key_raw());
        assert_ne!(b.public_key_raw(), c.public_key_raw());
        assert_ne!(a.public_key_raw(), c.public_key_raw());
    }
}
