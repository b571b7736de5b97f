//! The service side of DPS TPM attestation: building the activation blob that only the TPM
//! holding a given endorsement key (EK) and storage root key (SRK) can import (docs/protocol.md §6.2,
//! §6.4). Pure Rust, no TPM needed: TPM 2.0 Part 1 §24 (credential protection: MakeCredential)
//! and §23.3 (duplication: the wrap an Import undoes), with SHA-256 names, KDFa (SP 800-108
//! counter mode over HMAC-SHA256), RSA-OAEP-SHA256 with the TPM's labels, and AES-128-CFB with a
//! zero IV.

use aes::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};
use num_bigint::BigUint;
use ring::digest::{SHA256, digest};
use ring::hmac;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TpmKeyError {
    #[error("not a TPM2B_PUBLIC: {0}")]
    Malformed(String),
    #[error("the key is not an RSA-2048 storage key with SHA-256 names and AES-128-CFB: {0}")]
    Unsupported(String),
}

/// The parts of an RSA TPMT_PUBLIC the blob needs.
#[derive(Debug, Clone)]
pub struct RsaPublic {
    /// The marshalled TPMT_PUBLIC (what the name hashes).
    pub tpmt: Vec<u8>,
    pub modulus: Vec<u8>,
    pub exponent: u32,
    pub object_attributes: u32,
}

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_KEYEDHASH: u16 = 0x0008;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_AES: u16 = 0x0006;
const TPM_ALG_CFB: u16 = 0x0043;
const TPM_ALG_HMAC: u16 = 0x0005;
const TPM_ALG_NULL: u16 = 0x0010;

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmKeyError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| TpmKeyError::Malformed(format!("truncated at byte {}", self.at)))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, TpmKeyError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, TpmKeyError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], TpmKeyError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Parses a TPM2B_PUBLIC holding an RSA-2048 decryption key with SHA-256 name algorithm and an
/// AES-128-CFB symmetric definition: the EK and SRK Azure's devices send.
pub fn parse_rsa_public(tpm2b_public: &[u8]) -> Result<RsaPublic, TpmKeyError> {
    let mut outer = Reader {
        data: tpm2b_public,
        at: 0,
    };
    let tpmt = outer.tpm2b()?;
    if outer.at != tpm2b_public.len() {
        return Err(TpmKeyError::Malformed(format!(
            "{} bytes after the structure",
            tpm2b_public.len() - outer.at
        )));
    }
    let mut r = Reader { data: tpmt, at: 0 };
    let kind = r.u16()?;
    if kind != TPM_ALG_RSA {
        return Err(TpmKeyError::Unsupported(format!(
            "type {kind:#06x}, not RSA"
        )));
    }
    let name_alg = r.u16()?;
    if name_alg != TPM_ALG_SHA256 {
        return Err(TpmKeyError::Unsupported(format!(
            "name algorithm {name_alg:#06x}, not SHA-256"
        )));
    }
    let object_attributes = r.u32()?;
    let _auth_policy = r.tpm2b()?;
    let sym = r.u16()?;
    if sym != TPM_ALG_AES {
        return Err(TpmKeyError::Unsupported(format!(
            "symmetric algorithm {sym:#06x}, not AES"
        )));
    }
    let sym_bits = r.u16()?;
    let sym_mode = r.u16()?;
    if sym_bits != 128 || sym_mode != TPM_ALG_CFB {
        return Err(TpmKeyError::Unsupported(format!(
            "AES-{sym_bits} mode {sym_mode:#06x}"
        )));
    }
    let scheme = r.u16()?;
    if scheme != TPM_ALG_NULL {
        // Restricted decryption keys have a NULL scheme; anything else carries details we do
        // not parse.
        return Err(TpmKeyError::Unsupported(format!("scheme {scheme:#06x}")));
    }
    let key_bits = r.u16()?;
    if key_bits != 2048 {
        return Err(TpmKeyError::Unsupported(format!("{key_bits}-bit RSA")));
    }
    let exponent = match r.u32()? {
        0 => 65537,
        e => e,
    };
    let modulus = r.tpm2b()?.to_vec();
    if modulus.len() != 256 {
        return Err(TpmKeyError::Malformed(format!(
            "a {}-byte modulus for RSA-2048",
            modulus.len()
        )));
    }
    if r.at != tpmt.len() {
        return Err(TpmKeyError::Malformed(
            "trailing bytes in TPMT_PUBLIC".into(),
        ));
    }
    Ok(RsaPublic {
        tpmt: tpmt.to_vec(),
        modulus,
        exponent,
        object_attributes,
    })
}

/// `nameAlg ‖ H(TPMT_PUBLIC)`: how the TPM names an object.
pub fn name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut out = TPM_ALG_SHA256.to_be_bytes().to_vec();
    out.extend_from_slice(digest(&SHA256, tpmt_public).as_ref());
    out
}

fn tpm2b(data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2) with HMAC-SHA256: counter ‖ label ‖ 0 ‖ contextU ‖
/// contextV ‖ bits, truncated to `bits`.
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 0;
    while out.len() < bytes {
        counter += 1;
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
    }
    out.truncate(bytes);
    out
}

/// AES-128 in CFB mode (full-block feedback) with a zero IV, as the TPM uses for these wraps.
pub fn aes128_cfb_encrypt(key: &[u8], data: &[u8]) -> Vec<u8> {
    let cipher = aes::Aes128::new(GenericArray::from_slice(key));
    let mut feedback = [0u8; 16];
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut block = GenericArray::clone_from_slice(&feedback);
        cipher.encrypt_block(&mut block);
        let start = out.len();
        out.extend(chunk.iter().zip(block.iter()).map(|(p, k)| p ^ k));
        if chunk.len() == 16 {
            feedback.copy_from_slice(&out[start..]);
        }
    }
    out
}

/// MGF1 with SHA-256 (RFC 8017 §B.2.1).
fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 0;
    while out.len() < len {
        let mut input = seed.to_vec();
        input.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(digest(&SHA256, &input).as_ref());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// RSAES-OAEP encryption with SHA-256 and MGF1-SHA-256 (RFC 8017 §7.1.1). `label` is the TPM's
/// label including its terminating zero ("IDENTITY\0", "DUPLICATE\0").
pub fn rsa_oaep_encrypt(key: &RsaPublic, label: &[u8], message: &[u8], seed: &[u8; 32]) -> Vec<u8> {
    let k = key.modulus.len();
    let h_len = 32;
    assert!(
        message.len() <= k - 2 * h_len - 2,
        "message too long for OAEP"
    );
    let l_hash = digest(&SHA256, label);
    let mut db = l_hash.as_ref().to_vec();
    db.resize(k - message.len() - h_len - 2, 0);
    db.push(1);
    db.extend_from_slice(message);
    let db_mask = mgf1(seed, k - h_len - 1);
    let masked_db: Vec<u8> = db.iter().zip(db_mask).map(|(a, b)| a ^ b).collect();
    let seed_mask = mgf1(&masked_db, h_len);
    let masked_seed: Vec<u8> = seed.iter().zip(seed_mask).map(|(a, b)| a ^ b).collect();
    let mut em = vec![0u8];
    em.extend_from_slice(&masked_seed);
    em.extend_from_slice(&masked_db);
    let m = BigUint::from_bytes_be(&em);
    let n = BigUint::from_bytes_be(&key.modulus);
    let c = m.modpow(&BigUint::from(key.exponent), &n).to_bytes_be();
    let mut out = vec![0u8; k - c.len()];
    out.extend_from_slice(&c);
    out
}

/// TPM2_MakeCredential done in software: protects `credential` so that only the TPM holding
/// `ek`'s private key can recover it, and only for the object named `object_name` (the SRK,
/// which the device passes as ActivateCredential's activateHandle). Returns the TPM2B_ID_OBJECT
/// and the TPM2B_ENCRYPTED_SECRET, marshalled.
pub fn make_credential(
    ek: &RsaPublic,
    credential: &[u8],
    object_name: &[u8],
    seed: &[u8; 32],
    oaep_seed: &[u8; 32],
) -> (Vec<u8>, Vec<u8>) {
    let secret = rsa_oaep_encrypt(ek, b"IDENTITY\0", seed, oaep_seed);
    let sym_key = kdfa(seed, "STORAGE", object_name, &[], 128);
    let enc_identity = aes128_cfb_encrypt(&sym_key, &tpm2b(credential));
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    mac.update(&enc_identity);
    mac.update(object_name);
    let mut id_object = tpm2b(mac.sign().as_ref());
    id_object.extend_from_slice(&enc_identity);
    (tpm2b(&id_object), tpm2b(&secret))
}

/// The public area of the HMAC key DPS hands the device: keyed-hash, SHA-256 names,
/// userWithAuth|sign (fixedTPM/fixedParent clear, as an imported object must have), scheme
/// HMAC-SHA256, unique = SHA-256(obfuscation ‖ key) (checked by the TPM on Load).
pub fn hmac_key_public(key: &[u8], obfuscation: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&TPM_ALG_KEYEDHASH.to_be_bytes());
    out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    out.extend_from_slice(&0x0004_0040u32.to_be_bytes());
    out.extend_from_slice(&tpm2b(&[]));
    out.extend_from_slice(&TPM_ALG_HMAC.to_be_bytes());
    out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    let mut unique_input = obfuscation.to_vec();
    unique_input.extend_from_slice(key);
    out.extend_from_slice(&tpm2b(digest(&SHA256, &unique_input).as_ref()));
    out
}

/// The duplication wrap (inner symmetric wrapper with `inner_key`, outer wrapper to `parent`)
/// of a keyed-hash object holding `key`. Returns (TPM2B_PUBLIC, TPM2B_PRIVATE, TPM2B_ENCRYPTED_SECRET).
pub fn wrap_hmac_key(
    parent: &RsaPublic,
    key: &[u8],
    inner_key: &[u8],
    obfuscation: &[u8; 32],
    seed: &[u8; 32],
    oaep_seed: &[u8; 32],
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let public = hmac_key_public(key, obfuscation);
    let object_name = name(&public);
    let mut sensitive = TPM_ALG_KEYEDHASH.to_be_bytes().to_vec();
    sensitive.extend_from_slice(&tpm2b(&[])); // authValue
    sensitive.extend_from_slice(&tpm2b(obfuscation)); // seedValue
    sensitive.extend_from_slice(&tpm2b(key)); // sensitive.bits
    let sensitive = tpm2b(&sensitive);
    // Inner wrapper.
    let mut integrity_input = sensitive.clone();
    integrity_input.extend_from_slice(&object_name);
    let mut inner = tpm2b(digest(&SHA256, &integrity_input).as_ref());
    inner.extend_from_slice(&sensitive);
    let enc_sensitive = aes128_cfb_encrypt(inner_key, &inner);
    // Outer wrapper, to the new parent.
    let in_sym_seed = rsa_oaep_encrypt(parent, b"DUPLICATE\0", seed, oaep_seed);
    let outer_key = kdfa(seed, "STORAGE", &object_name, &[], 128);
    let dup_sensitive = aes128_cfb_encrypt(&outer_key, &enc_sensitive);
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    mac.update(&dup_sensitive);
    mac.update(&object_name);
    let mut duplicate = tpm2b(mac.sign().as_ref());
    duplicate.extend_from_slice(&dup_sensitive);
    (tpm2b(&public), tpm2b(&duplicate), tpm2b(&in_sym_seed))
}

/// The blob DPS sends as `authenticationKey`: credentialBlob, secret (MakeCredential to the EK),
/// duplicate, inSymSeed, objectPublic (the key wrapped to the SRK under the credential), and an
/// empty encUriData. Only the TPM with this EK and SRK can turn it into a loaded HMAC key holding
/// `key`.
pub fn activation_blob(
    ek_tpm2b_public: &[u8],
    srk_tpm2b_public: &[u8],
    key: &[u8],
) -> Result<Vec<u8>, TpmKeyError> {
    let ek = parse_rsa_public(ek_tpm2b_public)?;
    let srk = parse_rsa_public(srk_tpm2b_public)?;
    let inner_key: [u8; 16] = rand::random();
    let (credential_blob, secret) = make_credential(
        &ek,
        &inner_key,
        &name(&srk.tpmt),
        &rand::random(),
        &rand::random(),
    );
    let (public, duplicate, in_sym_seed) = wrap_hmac_key(
        &srk,
        key,
        &inner_key,
        &rand::random(),
        &rand::random(),
        &rand::random(),
    );
    let mut blob = credential_blob;
    blob.extend_from_slice(&secret);
    blob.extend_from_slice(&duplicate);
    blob.extend_from_slice(&in_sym_seed);
    blob.extend_from_slice(&public);
    blob.extend_from_slice(&tpm2b(&[]));
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// The EK of Azure CLI's tests (docs/protocol.md §6.7).
    const CLI_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAibym9HQP9vxCGF5dVc1QQsAGe021aUGJzNol1/gycBx3jFsTpwmWbISRwnFvflWd0w2Mc44FAAZNaJOAAxwZvG8GvyLlHh6fGKdh+mSBL4iLH2bZ4Ry22cB3CJVjXmdGoz9Y/j3/NwLndBxQC+baNvzvyVQZ4/A2YL7vzIIj2ik4y+ve9ir7U0GbNdnxskqK1KFIITVVtkTIYyyFTIR0BySjPrRIDj7r7Mh5uF9HBppGKQCBoVSVV8dI91lNazmSdpGWyqCkO7iM4VvUMv2HT/ym53aYlUrau+Qq87Tu+uQipWYgRdF11KDfcpMHqqzBQQ1NpOJVhrsTrhyJzO7KNw==";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn parses_the_cli_ek_and_names_it() {
        let ek = base64::engine::general_purpose::STANDARD
            .decode(CLI_EK)
            .unwrap();
        let parsed = parse_rsa_public(&ek).unwrap();
        assert_eq!(parsed.exponent, 65537);
        assert_eq!(parsed.object_attributes, 0x000300b2);
        assert_eq!(
            hex(&name(&parsed.tpmt)),
            "000b7a6ab59844b65381f70604d89f6d254667e7fbd18f41ce09317cb60201612038"
        );
        // Truncated or padded inputs are refused, not misread.
        assert!(parse_rsa_public(&ek[..100]).is_err());
        let mut longer = ek.clone();
        longer.push(0);
        assert!(parse_rsa_public(&longer).is_err());
    }

    #[test]
    fn aes_cfb_follows_its_definition() {
        // CFB128 by definition (SP 800-38A §6.3): C1 = P1 ^ AES(IV = 0), Cj = Pj ^ AES(Cj-1),
        // the last block possibly partial.
        let key: Vec<u8> = (0..16).map(|i| i as u8).collect();
        let cipher = aes::Aes128::new(GenericArray::from_slice(&key));
        let mut keystream = GenericArray::clone_from_slice(&[0u8; 16]);
        cipher.encrypt_block(&mut keystream);
        let plain = b"sixteen byte msg and a tail";
        let out = aes128_cfb_encrypt(&key, plain);
        assert_eq!(out.len(), plain.len());
        let first: Vec<u8> = plain[..16]
            .iter()
            .zip(keystream)
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(&out[..16], first.as_slice());
        // The second block's keystream is AES(key, first ciphertext block).
        let mut ks2 = GenericArray::clone_from_slice(&out[..16]);
        cipher.encrypt_block(&mut ks2);
        let second: Vec<u8> = plain[16..].iter().zip(ks2).map(|(a, b)| a ^ b).collect();
        assert_eq!(&out[16..], second.as_slice());
    }

    #[test]
    fn kdfa_is_counter_mode_hmac() {
        let a = kdfa(b"seed", "STORAGE", b"name", b"", 128);
        assert_eq!(a.len(), 16);
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, b"seed"));
        ctx.update(&[0, 0, 0, 1]);
        ctx.update(b"STORAGE\0name");
        ctx.update(&128u32.to_be_bytes());
        assert_eq!(a, ctx.sign().as_ref()[..16].to_vec());
        assert_eq!(kdfa(b"seed", "INTEGRITY", b"", b"", 512).len(), 64);
    }

    #[test]
    fn blob_layout_follows_the_sdks() {
        let ek = base64::engine::general_purpose::STANDARD
            .decode(CLI_EK)
            .unwrap();
        let key = [7u8; 32];
        let blob = activation_blob(&ek, &ek, &key).unwrap();
        let mut r = Reader { data: &blob, at: 0 };
        let id_object = r.tpm2b().unwrap();
        assert_eq!(id_object.len(), 2 + 32 + 2 + 16);
        assert_eq!(r.tpm2b().unwrap().len(), 256);
        let duplicate = r.tpm2b().unwrap();
        assert_eq!(
            duplicate.len(),
            2 + 32 + 2 + 2 + 32 + 2 + 2 + 2 + 32 + 2 + 32
        );
        assert_eq!(r.tpm2b().unwrap().len(), 256);
        let public = r.tpm2b().unwrap();
        assert_eq!(&public[..8], &[0, 8, 0, 0x0b, 0, 4, 0, 0x40]);
        assert_eq!(r.tpm2b().unwrap(), &[] as &[u8]);
        assert_eq!(r.at, blob.len());
    }
}
