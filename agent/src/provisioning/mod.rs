//! Provisioning: finding out which hub this device belongs to. The DPS client registers; the
//! assignment is cached in the state dir (`state::ProvisioningCache`) with the fingerprint of
//! the settings that produced it, so a reboot with unchanged settings makes no DPS call.

pub mod dps;

use serde::{Deserialize, Serialize};

/// Where DPS (or a manual configuration) put this device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    /// `initialAssignment`, `deviceDataMigrated`, … (empty for manual).
    pub substatus: String,
    /// DPS's full `registrationState`.
    pub registration_state: serde_json::Value,
}
