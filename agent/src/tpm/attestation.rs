//! DPS TPM attestation, device side: the activation blob DPS sends (protocol.md §6.2) is
//! unwrapped with ActivateCredential (EK) and Import (SRK), and the key it carries becomes the
//! persistent HMAC key.
