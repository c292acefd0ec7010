//! Notifications: delivering what the alerts queued in the store's outbox, and keeping an MQTT
//! broker's view of every monitor current.
//!
//! - [`outbox`] delivers queued notifications at least once, in order per incident and target,
//!   with retries and backoff: webhooks (signed with HMAC-SHA256) and MQTT events; a restart
//!   resumes where it stopped.
//! - [`mqtt`] owns the broker connection: retained state per monitor, availability with a last
//!   will, Home Assistant discovery, and acknowledged publishes for the outbox.

pub(crate) mod mqtt;
pub(crate) mod outbox;
