//! `hubagent-tpm`: every TPM operation of the agent, in a process of its own that the agent
//! starts on its first TPM operation (identity/tpm/client.rs) and talks to over its stdin and
//! stdout (identity/tpm/protocol.rs). Only this executable links the TPM libraries (libtss2-esys,
//! -mu, -tctildr and what they pull in), so an agent that uses no TPM maps none of them
//! (docs/benchmarks.md, "Where the memory goes"; docs/tpm.md, "The TPM helper").
//!
//!     hubagent-tpm --build B
//!
//! `--build` is the agent's [`BUILD`]; a helper of another build refuses to run. It then writes
//! its [`Hello`] and answers one request at a time until its input ends. Nothing it reads that is
//! secret (a key to import, the hierarchies' authorization values) is written back or printed:
//! its stdout carries only answers, its stderr (the agent's, so the journal) only warnings.

mod attestation;
mod blob;
mod ecc_key;
mod esapi;

use std::io::{BufReader, BufWriter};
use std::process::ExitCode;

use hubagent::identity::tpm::protocol::{
    self, Answer, BUILD, FILE_NAME, Hello, PROTOCOL, Reply, Request,
};

fn main() -> ExitCode {
    quiet_tss();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, build] if flag == "--build" && build == BUILD => {}
        [flag, build] if flag == "--build" => {
            eprintln!(
                "{FILE_NAME}: this is build {BUILD}; the agent that started it is build {build}: reinstall the hubagent package"
            );
            return ExitCode::from(2);
        }
        _ => {
            eprintln!("{FILE_NAME}: internal to hubagent, started by the agent only (--build B)");
            return ExitCode::from(2);
        }
    }
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{FILE_NAME}: the connection to the agent failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The TPM library (tpm2-tss) prints its own ERROR lines on stderr for conditions the agent
/// reports itself in plainer words (an empty handle, a missing device). Unless the operator asked
/// for them with TSS2_LOG (the helper inherits the agent's environment), keep them out of the
/// journal.
fn quiet_tss() {
    if std::env::var_os("TSS2_LOG").is_none() {
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::set_var("TSS2_LOG", "all+NONE") };
    }
}

/// Answers requests until the agent closes the helper's input.
fn serve() -> std::io::Result<()> {
    let mut requests = BufReader::new(std::io::stdin().lock());
    let mut answers = BufWriter::new(std::io::stdout().lock());
    protocol::write_frame(
        &mut answers,
        &Hello {
            protocol: PROTOCOL,
            build: BUILD.to_string(),
        },
    )?;
    while let Some(request) = protocol::read_frame::<Request>(&mut requests)? {
        let answer = handle(request);
        protocol::write_frame(&mut answers, &answer)?;
    }
    Ok(())
}

/// Runs one request against the TPM it names.
fn handle(request: Request) -> Answer {
    match request {
        Request::CheckHmacKey { tcti, handle } => {
            esapi::check_hmac_key(&tcti, handle).map(|()| Reply::Done)
        }
        Request::Hmac { tcti, handle, data } => esapi::hmac(&tcti, handle, &data).map(Reply::Bytes),
        Request::Identity { tcti, auth } => {
            esapi::identity(&tcti, &auth).map(|(endorsement_key, storage_root_key)| {
                Reply::Identity {
                    endorsement_key,
                    storage_root_key,
                }
            })
        }
        Request::ImportHmacKey {
            tcti,
            auth,
            handle,
            key,
            force,
        } => esapi::import_hmac_key(&tcti, &auth, handle, &key.0, force).map(Reply::Replaced),
        Request::ImportActivationBlob {
            tcti,
            auth,
            handle,
            blob,
        } => attestation::import_activation_blob(&tcti, &auth, handle, &blob).map(Reply::Replaced),
        Request::Evict {
            tcti,
            auth,
            handle,
            force,
        } => esapi::evict(&tcti, &auth, handle, force).map(Reply::Replaced),
        Request::HandleCounts { tcti } => esapi::handle_counts(&tcti).map(Reply::HandleCounts),
        Request::CreateEccKey { tcti, auth } => {
            ecc_key::create(&tcti, &auth).map(|(blobs, point)| Reply::EccKey { blobs, point })
        }
        Request::ReadEccKey { blobs } => {
            ecc_key::read(&blobs).map(|point| Reply::EccKey { blobs, point })
        }
        Request::CheckEccKey { tcti, auth, blobs } => {
            ecc_key::check(&tcti, &auth, &blobs).map(|()| Reply::Done)
        }
        Request::SignEcc {
            tcti,
            auth,
            blobs,
            digest,
        } => ecc_key::sign(&tcti, &auth, &blobs, &digest).map(Reply::Bytes),
    }
}
