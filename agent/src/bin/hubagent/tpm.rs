//! `hubagent tpm import-key` and `hubagent tpm show-ek`.

use std::io::Read;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::Zeroizing;

use crate::args::{TpmCommand, TpmTarget, exit};
use hubagent::config::{
    Attestation, Config, DEFAULT_TPM_HANDLE, check_tpm_handle, parse_tpm_handle,
};
use hubagent::identity::keys::{MemoryKey, derive_device_key};

use hubagent::identity::tpm::{self, HierarchyAuth};

/// Runs a `hubagent tpm …` command; returns the exit code.
pub fn run(config_path: &Path, command: TpmCommand) -> i32 {
    match command {
        TpmCommand::ImportKey {
            target,
            group_registration_id,
            force,
        } => import_key(
            config_path,
            &target,
            group_registration_id.as_deref(),
            force,
        ),
        TpmCommand::ShowEk { tcti, json } => {
            let target = TpmTarget { tcti, handle: None };
            let (tcti, _, auth) = match resolve(config_path, &target) {
                Ok(t) => t,
                Err(code) => return code,
            };
            show_ek(&tcti, &auth, json)
        }
    }
}

/// The TCTI and handle: flags, else the configuration (when it exists and uses the TPM), else
/// the defaults. The hierarchy authorizations come from the configuration when it uses the same
/// TPM.
fn resolve(config_path: &Path, target: &TpmTarget) -> Result<(String, u32, HierarchyAuth), i32> {
    let mut auth = HierarchyAuth::EMPTY;
    let from_config = if !config_path.exists() {
        None
    } else {
        match Config::load(config_path, &|k| std::env::var(k).ok()) {
            Ok(config) => match config.provisioning.attestation {
                Some(Attestation::Tpm {
                    tcti,
                    handle,
                    owner_auth,
                    endorsement_auth,
                    ..
                }) if target.tcti.as_ref().is_none_or(|flag| *flag == tcti) => {
                    auth =
                        HierarchyAuth::from_secrets(owner_auth.as_ref(), endorsement_auth.as_ref())
                            .map_err(|e| {
                                eprintln!("hubagent: {e}");
                                exit::CONFIG
                            })?;
                    Some((tcti, handle))
                }
                _ => None,
            },
            // Flags alone are enough: a broken configuration only matters without them.
            Err(_) if target.tcti.is_some() && target.handle.is_some() => None,
            Err(e) => {
                eprintln!("hubagent: {e} (or give --tcti and --handle)");
                return Err(exit::CONFIG);
            }
        }
    };
    let tcti = target
        .tcti
        .clone()
        .or_else(|| from_config.as_ref().map(|(t, _)| t.clone()))
        .unwrap_or_else(|| "device:/dev/tpmrm0".to_string());
    let handle = match &target.handle {
        Some(text) => parse_tpm_handle(text).map_err(|e| {
            eprintln!("hubagent: --handle: {e}");
            exit::CONFIG
        })?,
        None => from_config.map(|(_, h)| h).unwrap_or(DEFAULT_TPM_HANDLE),
    };
    check_tpm_handle(handle).map_err(|e| {
        eprintln!("hubagent: handle {e}");
        exit::CONFIG
    })?;
    Ok((tcti, handle, auth))
}

fn import_key(
    config_path: &Path,
    target: &TpmTarget,
    group_registration_id: Option<&str>,
    force: bool,
) -> i32 {
    let (tcti, handle, auth) = match resolve(config_path, target) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let mut text = Zeroizing::new(String::new());
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("hubagent: reading the key from stdin: {e}");
        return exit::FAILURE;
    }
    let key_b64: Zeroizing<String> = match group_registration_id {
        None => Zeroizing::new(text.trim().to_string()),
        Some(id) => {
            if !hubagent::config::valid_registration_id(id) {
                eprintln!("hubagent: '{id}' is not a valid registration id");
                return exit::FAILURE;
            }
            let derived = MemoryKey::from_base64(&text, "the group key on stdin")
                .and_then(|group| derive_device_key(&group, id));
            match derived {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("hubagent: {e}");
                    return exit::FAILURE;
                }
            }
        }
    };
    if key_b64.is_empty() {
        eprintln!(
            "hubagent: no key on stdin (pipe the base64 key in: hubagent tpm import-key < device.key)"
        );
        return exit::FAILURE;
    }
    let key = match B64.decode(key_b64.as_bytes()) {
        Ok(k) => Zeroizing::new(k),
        Err(_) => {
            eprintln!(
                "hubagent: the key on stdin is not base64 (expected the key as the Azure portal shows it)"
            );
            return exit::FAILURE;
        }
    };
    match tpm::import_hmac_key(&tcti, &auth, handle, &key, force) {
        Ok(replaced) => {
            let what = match replaced {
                tpm::Replaced::Nothing => String::new(),
                tpm::Replaced::HmacKey => " (replacing the HMAC key that was there)".into(),
                tpm::Replaced::Foreign(w) => format!(" (replacing {w}, as --force asked)"),
            };
            let derived = group_registration_id
                .map(|id| format!("device key derived for '{id}'"))
                .unwrap_or_else(|| "device key".into());
            println!("imported the {derived} into TPM handle {handle:#010x}{what}");
            exit::OK
        }
        Err(e) => {
            eprintln!("hubagent: {e}");
            exit::FAILURE
        }
    }
}

fn show_ek(tcti: &str, auth: &HierarchyAuth, json: bool) -> i32 {
    match tpm::identity(tcti, auth) {
        Ok(identity) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "endorsementKey": identity.endorsement_key_base64(),
                        "storageRootKey": identity.storage_root_key_base64(),
                        "registrationId": identity.registration_id,
                    })
                );
            } else {
                println!("registration id:  {}", identity.registration_id);
                println!("endorsement key:  {}", identity.endorsement_key_base64());
                println!("storage root key: {}", identity.storage_root_key_base64());
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("hubagent: {e}");
            exit::FAILURE
        }
    }
}
