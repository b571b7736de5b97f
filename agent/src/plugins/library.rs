//! Loading a plugin library and calling it through the ABI of `hubagent_plugin.h`: the trust
//! check, the descriptor check before anything else is called, and the host API table. Used by
//! the plugin process (`hubagent-plugin-host`) and by in-process plugins alike.
//!
//! Libraries are opened with RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE through `/proc/self/fd/N` of
//! the file that passed the trust check (so a file swapped in after the check is not what gets
//! loaded; the fd stays open, see [`kept_open`]), and are never unloaded.

use std::ffi::{CStr, c_void};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hubagent_plugin_sdk::abi;

use super::calls::{self, C2dMessage, Declarations, MethodAnswer};

/// A message as a plugin published it (the host adds id, time and the `source` property).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginMessage {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub properties: Vec<(String, String)>,
    /// ABI 1.2 / exec `creationTime`: when the reading was taken (RFC 3339 UTC); `None`: now.
    pub creation_time: Option<String>,
}

/// What a host does with a plugin's calls; implemented by the plugin process (frames to the
/// daemon) and by in-process plugins (straight to the supervisor). Called from plugin threads.
pub trait HostSide: Send + Sync + 'static {
    /// Returns an ABI result code once the message is queued durably (or refused).
    fn publish(&self, message: PluginMessage) -> i32;
    /// ABI 1.3: the code of each message, in order, once the accepted ones are queued durably
    /// (in order, with one round trip to the daemon) and the others refused.
    fn publish_batch(&self, messages: Vec<PluginMessage>) -> Vec<i32>;
    fn log(&self, level: i32, text: &str);
    fn health(&self, state: i32, detail: &str);
    /// ABI 1.2: the plugin's own reported properties, already checked against the hub's
    /// limits (`own_reported::check`).
    fn report(&self, properties: serde_json::Map<String, serde_json::Value>);
}

/// A loaded library whose descriptor passed the checks. Never unloaded.
pub struct Library {
    descriptor: &'static abi::PluginDescriptor,
    pub name: String,
    pub version: String,
    pub abi_major: u16,
    pub abi_minor: u16,
    /// ABI 1.1: the methods and C2D messages it takes (none for a 1.0 plugin).
    pub declarations: Declarations,
}

// SAFETY: the descriptor is immutable static data of a library that is never unloaded.
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

/// Why a start did not produce a running instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub code: i32,
    pub reason: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, code_name(self.code))
    }
}

pub fn code_name(code: i32) -> &'static str {
    match code {
        abi::OK => "ok",
        abi::ERR_REJECTED => "rejected",
        abi::ERR_FAILED => "failed",
        abi::ERR_PANICKED => "panicked",
        abi::ERR_INVALID_ARGUMENT => "invalid argument",
        abi::ERR_RATE_LIMITED => "rate limited",
        abi::ERR_STOPPING => "stopping",
        abi::ERR_TOO_LARGE => "too large",
        _ => "unknown error code",
    }
}

/// Checks the descriptor a library returned; nothing else in it is called before this passes.
pub fn check_descriptor(d: &abi::PluginDescriptor) -> Result<(), String> {
    if d.magic != abi::MAGIC {
        return Err(format!(
            "descriptor magic {:#010x} is not {:#010x}: not a hubagent plugin, or a corrupt one",
            d.magic,
            abi::MAGIC
        ));
    }
    if d.abi_major != abi::ABI_MAJOR {
        return Err(format!(
            "plugin ABI {}.{} is not supported by this agent (ABI {}.{}): rebuild the plugin against this agent's hubagent_plugin.h",
            d.abi_major,
            d.abi_minor,
            abi::ABI_MAJOR,
            abi::ABI_MINOR
        ));
    }
    if d.abi_minor > abi::ABI_MINOR {
        return Err(format!(
            "plugin ABI {}.{} is newer than this agent's {}.{}: upgrade the agent",
            d.abi_major,
            d.abi_minor,
            abi::ABI_MAJOR,
            abi::ABI_MINOR
        ));
    }
    for (what, size, min) in [
        (
            "descriptor_size",
            d.descriptor_size,
            abi::DESCRIPTOR_SIZE_V1_0,
        ),
        ("host_api_size", d.host_api_size, abi::HOST_API_SIZE_V1_0),
        ("message_size", d.message_size, abi::MESSAGE_SIZE_V1_0),
    ] {
        if size < min {
            return Err(format!(
                "descriptor {what} is {size}, below the ABI 1.0 size {min}: built against a broken header"
            ));
        }
    }
    if d.start.is_none() || d.apply_settings.is_none() || d.stop.is_none() {
        return Err("descriptor lacks start, apply_settings or stop".into());
    }
    if d.name.is_null() || d.version.is_null() {
        return Err("descriptor lacks a name or version".into());
    }
    Ok(())
}

/// ABI 1.1: the methods and C2D filter of a checked descriptor, read only when its
/// `descriptor_size` covers them (a 1.0 plugin declares nothing).
pub fn declarations(d: &abi::PluginDescriptor) -> Result<Declarations, String> {
    if d.descriptor_size < abi::DESCRIPTOR_SIZE_V1_1 {
        return Ok(Declarations::default());
    }
    let mut methods = Vec::new();
    if !d.methods.is_null() {
        let mut at = d.methods;
        loop {
            // SAFETY: per the ABI, NUL-terminated names in static memory, ended by an empty one.
            let name = unsafe { CStr::from_ptr(at) };
            if name.is_empty() {
                break;
            }
            if methods.len() == calls::MAX_METHODS {
                return Err(format!(
                    "declares more than {} methods (is the list ended by an empty name?)",
                    calls::MAX_METHODS
                ));
            }
            let bytes = name.to_bytes();
            methods.push(
                std::str::from_utf8(bytes)
                    .map_err(|_| "a method name is not UTF-8".to_string())?
                    .to_string(),
            );
            // SAFETY: the next name starts after this one's NUL, inside the list.
            at = unsafe { at.add(bytes.len() + 1) };
        }
    }
    let filter = if d.c2d_filter.is_null() {
        None
    } else {
        // SAFETY: NUL-terminated static text per the ABI.
        let text = unsafe { CStr::from_ptr(d.c2d_filter) };
        Some(
            text.to_str()
                .map_err(|_| "the c2d filter is not UTF-8".to_string())?
                .to_string(),
        )
    };
    if !methods.is_empty() && d.invoke_method.is_none() {
        return Err("descriptor declares methods but no invoke_method".into());
    }
    if filter.is_some() && d.receive_c2d.is_none() {
        return Err("descriptor declares a c2d filter but no receive_c2d".into());
    }
    Declarations::new(methods, filter.as_deref())
}

/// The ELF machine and class (32/64-bit) this agent was built for.
pub const HOST_MACHINE: (u16, u8) = (
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "arm") {
        40
    } else if cfg!(target_arch = "x86") {
        3
    } else if cfg!(target_arch = "riscv64") {
        243
    } else {
        0
    },
    if cfg!(target_pointer_width = "64") {
        2
    } else {
        1
    },
);

/// A readable name of an ELF machine and class, as Debian names the architecture where it can.
pub fn machine_name(machine: u16, class: u8) -> String {
    match (machine, class) {
        (62, 2) => "x86-64 (amd64)".into(),
        (62, 1) => "x86-64 32-bit (x32)".into(),
        (183, 2) => "AArch64 (arm64)".into(),
        (40, 1) => "32-bit ARM (armhf/armel)".into(),
        (3, 1) => "x86 (i386)".into(),
        (243, 2) => "RISC-V 64 (riscv64)".into(),
        (m, c) => format!("ELF machine {m}, {}-bit", if c == 2 { 64 } else { 32 }),
    }
}

/// Checks the ELF header of a library before it is loaded: a library built for another
/// architecture is refused with both architectures named (dlopen's own error names neither: an
/// AArch64 library on x86-64 gave `cannot load: dlopen failed`).
pub fn check_elf_header(header: &[u8]) -> Result<(), String> {
    if header.len() < 20 || header[..4] != *b"\x7fELF" {
        return Err("not an ELF shared library (no ELF header)".into());
    }
    let class = header[4];
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        d => return Err(format!("ELF header with unknown data encoding {d}")),
    };
    let (host_machine, host_class) = HOST_MACHINE;
    let big_endian = cfg!(target_endian = "big");
    if (machine, class) != (host_machine, host_class) || (header[5] == 2) != big_endian {
        return Err(format!(
            "built for {}{}, but this agent runs on {}: build the plugin for this architecture (see docs/plugins.md)",
            machine_name(machine, class),
            if header[5] == 2 { ", big-endian" } else { "" },
            machine_name(host_machine, host_class)
        ));
    }
    Ok(())
}

/// The files of the libraries loaded so far, by (device, inode), kept open for good.
static LOADED_FILES: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), std::fs::File>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The `/proc/self/fd/N` path to open a checked library file by. glibc's dlopen takes an object
/// already loaded under the same name for the one asked for, so a library's fd stays open as long
/// as the library stays loaded (for good): a closed and reused fd number would make the next,
/// different library resolve to this one. The same file loaded again (a plugin restarted) gets
/// its first fd, so the fds kept are one per distinct file.
fn kept_open(file: std::fs::File, id: (u64, u64)) -> String {
    use std::os::fd::AsRawFd;
    let mut files = LOADED_FILES.lock().unwrap_or_else(|e| e.into_inner());
    format!(
        "/proc/self/fd/{}",
        files.entry(id).or_insert(file).as_raw_fd()
    )
}

impl Library {
    /// Checks the path, loads the library (for good) and checks its descriptor.
    pub fn load(path: &Path, allow_unsafe: bool) -> Result<Library, String> {
        let real = super::trust::check(path, allow_unsafe)?;
        let file = std::fs::File::open(&real).map_err(|e| format!("{}: {e}", real.display()))?;
        let (checked, opened) = (
            std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?,
            file.metadata()
                .map_err(|e| format!("{}: {e}", real.display()))?,
        );
        if (checked.dev(), checked.ino()) != (opened.dev(), opened.ino()) {
            return Err(format!(
                "{}: the file changed while it was checked",
                real.display()
            ));
        }
        {
            use std::io::Read;
            let mut header = [0u8; 20];
            let n = (&file)
                .take(20)
                .read(&mut header)
                .map_err(|e| format!("{}: {e}", real.display()))?;
            check_elf_header(&header[..n]).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let via_fd = kept_open(file, (opened.dev(), opened.ino()));
        let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE;
        // SAFETY: loading runs the library's initialisers; the path passed the trust check.
        let lib = unsafe { libloading::os::unix::Library::open(Some(&via_fd), flags) }
            .map_err(|e| format!("{}: cannot load: {e}", path.display()))?;
        let symbol = format!("{}\0", abi::ENTRY_SYMBOL);
        // SAFETY: the symbol's type is fixed by the ABI (hubagent_plugin.h).
        let entry: abi::EntryFn = unsafe { lib.get::<abi::EntryFn>(symbol.as_bytes()) }
            .map(|s| *s)
            .map_err(|_| {
                format!(
                    "{}: exports no {}: not a hubagent plugin (see hubagent_plugin.h)",
                    path.display(),
                    abi::ENTRY_SYMBOL
                )
            })?;
        // The library is never unloaded (no dlclose): see the module docs.
        std::mem::forget(lib);
        // SAFETY: the entry point takes no arguments and returns a static descriptor.
        let descriptor = unsafe { entry() };
        if descriptor.is_null() {
            return Err(format!(
                "{}: the entry point returned no descriptor",
                path.display()
            ));
        }
        // SAFETY: non-null and static per the ABI; only the v1.0 prefix is read, after the
        // magic and sizes are checked.
        let descriptor: &'static abi::PluginDescriptor = unsafe { &*descriptor };
        check_descriptor(descriptor).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = |p: *const std::ffi::c_char| {
            // SAFETY: checked non-null; NUL-terminated static strings per the ABI.
            unsafe { CStr::from_ptr(p) }
                .to_string_lossy()
                .chars()
                .take(128)
                .collect::<String>()
        };
        let declarations =
            declarations(descriptor).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Library {
            descriptor,
            name: text(descriptor.name),
            version: text(descriptor.version),
            abi_major: descriptor.abi_major,
            abi_minor: descriptor.abi_minor,
            declarations,
        })
    }

    /// Calls `start`. The host side receives the plugin's calls until `stop` returns.
    pub fn start(
        &self,
        host: Arc<dyn HostSide>,
        settings: &str,
    ) -> Result<LibraryInstance, CallError> {
        let ctx = Box::leak(Box::new(HostContext {
            side: host,
            stopped: AtomicBool::new(false),
        }));
        // Leaked on purpose: a misbehaving plugin may keep the pointer past `stop`; it then finds
        // `stopped` set instead of freed memory. A few dozen bytes per start.
        let api: &'static abi::HostApi = Box::leak(Box::new(abi::HostApi {
            struct_size: std::mem::size_of::<abi::HostApi>() as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            ctx: (ctx as *const HostContext).cast_mut().cast(),
            publish: Some(host_publish),
            log: Some(host_log),
            report_health: Some(host_health),
            setting_string: Some(host_setting_string),
            setting_number: Some(host_setting_number),
            setting_bool: Some(host_setting_bool),
            setting_duration_ms: Some(host_setting_duration),
            report_properties: Some(host_report_properties),
            publish_batch: Some(host_publish_batch),
        }));
        let settings_z = nul_terminated(settings);
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut reason = ReasonBuf::new();
        let start = self.descriptor.start.expect("checked");
        // SAFETY: arguments follow the ABI: the table is 'static, settings and the reason buffer
        // outlive the call.
        let code = unsafe {
            start(
                api,
                abi::Str {
                    ptr: settings_z.as_ptr().cast(),
                    len: settings.len(),
                },
                &mut instance,
                reason.raw(),
            )
        };
        if code != abi::OK || instance.is_null() {
            ctx.stopped.store(true, Ordering::SeqCst);
            let code = if code == abi::OK {
                abi::ERR_FAILED
            } else {
                code
            };
            return Err(CallError {
                code,
                reason: reason.text_or(if instance.is_null() && code == abi::ERR_FAILED {
                    "start returned no instance"
                } else {
                    "no reason given"
                }),
            });
        }
        Ok(LibraryInstance {
            ptr: instance,
            descriptor: self.descriptor,
            ctx,
        })
    }
}

/// A started instance of a library plugin (the ABI's `instance` pointer). Callbacks must come
/// from one thread at a time.
pub struct LibraryInstance {
    ptr: *mut c_void,
    descriptor: &'static abi::PluginDescriptor,
    ctx: &'static HostContext,
}

// SAFETY: the ABI allows callbacks from any single host thread at a time; `&mut self` enforces it.
unsafe impl Send for LibraryInstance {}

impl LibraryInstance {
    pub fn apply_settings(&mut self, settings: &str) -> Result<(), CallError> {
        let settings_z = nul_terminated(settings);
        let mut reason = ReasonBuf::new();
        let apply = self.descriptor.apply_settings.expect("checked");
        // SAFETY: `ptr` came from start and is not stopped; buffers outlive the call.
        let code = unsafe {
            apply(
                self.ptr,
                abi::Str {
                    ptr: settings_z.as_ptr().cast(),
                    len: settings.len(),
                },
                reason.raw(),
            )
        };
        if code == abi::OK {
            Ok(())
        } else {
            Err(CallError {
                code,
                reason: reason.text_or("no reason given"),
            })
        }
    }

    /// Calls `invoke_method` (declared methods only: the caller checks); the plugin's status and
    /// JSON answer, checked.
    pub fn invoke_method(&mut self, method: &str, payload: &str) -> MethodAnswer {
        let Some(invoke) = self.descriptor.invoke_method else {
            return MethodAnswer::error(404, "the plugin answers no methods");
        };
        // NUL-terminated as settings are, for C plugins' convenience (the length excludes it).
        let (method_z, payload_z) = (nul_terminated(method), nul_terminated(payload));
        let mut answer = vec![0u8; calls::MAX_METHOD_ANSWER];
        let mut buf = abi::Buf {
            ptr: answer.as_mut_ptr(),
            cap: answer.len(),
            len: 0,
        };
        // SAFETY: `ptr` came from start and is not stopped; every buffer outlives the call.
        let status = unsafe {
            invoke(
                self.ptr,
                abi::Str {
                    ptr: method_z.as_ptr().cast(),
                    len: method.len(),
                },
                abi::Str {
                    ptr: payload_z.as_ptr().cast(),
                    len: payload.len(),
                },
                &mut buf,
            )
        };
        let len = buf.len.min(answer.len());
        MethodAnswer::from_plugin(i64::from(status), &answer[..len])
    }

    /// Calls `receive_c2d`: `Ok` once the plugin has the message.
    pub fn receive_c2d(&mut self, message: &C2dMessage) -> Result<(), CallError> {
        let Some(receive) = self.descriptor.receive_c2d else {
            return Err(CallError {
                code: abi::ERR_FAILED,
                reason: "the plugin takes no C2D messages".into(),
            });
        };
        let properties = abi::Property::borrow_all(&message.properties);
        let optional = |s: &Option<String>| s.as_deref().map_or(abi::Str::EMPTY, abi::Str::borrow);
        let raw = abi::C2dMessage {
            struct_size: abi::C2D_MESSAGE_SIZE_V1_1,
            reserved: 0,
            message_id: abi::Str::borrow(&message.message_id),
            body: abi::Bytes {
                ptr: message.body.as_ptr(),
                len: message.body.len(),
            },
            content_type: optional(&message.content_type),
            content_encoding: optional(&message.content_encoding),
            properties: properties.as_ptr(),
            property_count: properties.len(),
        };
        let mut reason = ReasonBuf::new();
        // SAFETY: `ptr` came from start and is not stopped; `raw` borrows what outlives the call.
        let code = unsafe { receive(self.ptr, &raw, reason.raw()) };
        if code == abi::OK {
            Ok(())
        } else {
            Err(CallError {
                code,
                reason: reason.text_or("no reason given"),
            })
        }
    }

    /// Stops and frees the instance; the plugin's later host calls get HUBAGENT_ERR_STOPPING.
    pub fn stop(self) -> i32 {
        let stop = self.descriptor.stop.expect("checked");
        // SAFETY: `ptr` came from start; ownership passes to the plugin, which frees it.
        let code = unsafe { stop(self.ptr) };
        self.ctx.stopped.store(true, Ordering::SeqCst);
        code
    }
}

/// What a plugin whose start failed answers a callback with.
fn not_started() -> CallError {
    CallError {
        code: abi::ERR_FAILED,
        reason: "not started".into(),
    }
}

/// `apply_settings` on the instance, or the error a plugin whose start failed answers with.
pub fn apply_if_started(
    instance: Option<&mut LibraryInstance>,
    settings: &str,
) -> Result<(), CallError> {
    match instance {
        Some(i) => i.apply_settings(settings),
        None => Err(not_started()),
    }
}

/// `invoke_method` on the instance, or 503 for a plugin whose start failed.
pub fn invoke_if_started(
    instance: Option<&mut LibraryInstance>,
    method: &str,
    payload: &str,
) -> MethodAnswer {
    match instance {
        Some(i) => i.invoke_method(method, payload),
        None => MethodAnswer::error(503, "the plugin is not started"),
    }
}

/// `receive_c2d` on the instance, or the error a plugin whose start failed answers with.
pub fn receive_if_started(
    instance: Option<&mut LibraryInstance>,
    message: &C2dMessage,
) -> Result<(), CallError> {
    match instance {
        Some(i) => i.receive_c2d(message),
        None => Err(not_started()),
    }
}

struct HostContext {
    side: Arc<dyn HostSide>,
    stopped: AtomicBool,
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 1);
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

struct ReasonBuf {
    bytes: Vec<u8>,
    buf: abi::Buf,
}

impl ReasonBuf {
    fn new() -> ReasonBuf {
        let mut bytes = vec![0u8; 4096];
        let buf = abi::Buf {
            ptr: bytes.as_mut_ptr(),
            cap: bytes.len(),
            len: 0,
        };
        ReasonBuf { bytes, buf }
    }

    fn raw(&mut self) -> *mut abi::Buf {
        &mut self.buf
    }

    fn text_or(&self, default: &str) -> String {
        let len = self.buf.len.min(self.bytes.len());
        let text = String::from_utf8_lossy(&self.bytes[..len])
            .trim()
            .to_string();
        if text.is_empty() {
            default.to_string()
        } else {
            text
        }
    }
}

/// Reads a borrowed ABI string as UTF-8.
///
/// # Safety
/// `s` must describe readable memory for the duration of the call.
unsafe fn str_arg(s: abi::Str) -> Result<String, ()> {
    // SAFETY: per the function contract.
    let bytes = unsafe { s.as_bytes() };
    String::from_utf8(bytes.to_vec()).map_err(|_| ())
}

/// # Safety
/// `message` must follow the ABI (fields borrowed for the call).
unsafe fn read_message(message: *const abi::Message) -> Result<PluginMessage, i32> {
    if message.is_null() {
        return Err(abi::ERR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null; struct_size is checked before the rest is trusted.
    let m = unsafe { &*message };
    if m.struct_size < abi::MESSAGE_SIZE_V1_0 {
        return Err(abi::ERR_INVALID_ARGUMENT);
    }
    let body = if m.body.ptr.is_null() || m.body.len == 0 {
        Vec::new()
    } else {
        if m.body.len > 1024 * 1024 {
            return Err(abi::ERR_TOO_LARGE);
        }
        // SAFETY: borrowed for the call per the ABI.
        unsafe { std::slice::from_raw_parts(m.body.ptr, m.body.len) }.to_vec()
    };
    let opt = |s: abi::Str| -> Result<Option<String>, i32> {
        if s.ptr.is_null() || s.len == 0 {
            return Ok(None);
        }
        // SAFETY: borrowed for the call per the ABI.
        unsafe { str_arg(s) }
            .map(Some)
            .map_err(|_| abi::ERR_INVALID_ARGUMENT)
    };
    let mut properties = Vec::with_capacity(m.property_count.min(64));
    if m.property_count > 0 {
        if m.properties.is_null() || m.property_count > 1024 {
            return Err(abi::ERR_INVALID_ARGUMENT);
        }
        // SAFETY: `property_count` entries borrowed for the call per the ABI.
        let props = unsafe { std::slice::from_raw_parts(m.properties, m.property_count) };
        for p in props {
            // SAFETY: as above.
            let key = unsafe { str_arg(p.key) }.map_err(|_| abi::ERR_INVALID_ARGUMENT)?;
            // SAFETY: as above.
            let value = unsafe { str_arg(p.value) }.map_err(|_| abi::ERR_INVALID_ARGUMENT)?;
            if key.is_empty() {
                return Err(abi::ERR_INVALID_ARGUMENT);
            }
            properties.push((key, value));
        }
    }
    // ABI 1.2: read only when the plugin's struct has the field.
    let creation_time = if m.struct_size >= abi::MESSAGE_SIZE_V1_2 && m.creation_time_ms != 0 {
        Some(creation_time(m.creation_time_ms).ok_or(abi::ERR_INVALID_ARGUMENT)?)
    } else {
        None
    };
    Ok(PluginMessage {
        body,
        content_type: opt(m.content_type)?,
        content_encoding: opt(m.content_encoding)?,
        properties,
        creation_time,
    })
}

/// A plugin's creation time in milliseconds since the epoch as RFC 3339 UTC with milliseconds
/// (`2026-12-06T04:00:00.250Z`); `None` before 1970 or past 9999.
pub fn creation_time(unix_ms: i64) -> Option<String> {
    let t =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000).ok()?;
    if unix_ms < 0 || t.year() > 9999 {
        return None;
    }
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .ok()
}

fn context<'a>(ctx: *mut c_void) -> Option<&'a HostContext> {
    // SAFETY: `ctx` is the leaked HostContext from `start` (never freed).
    (!ctx.is_null()).then(|| unsafe { &*ctx.cast::<HostContext>() })
}

unsafe extern "C" fn host_publish(ctx: *mut c_void, message: *const abi::Message) -> i32 {
    let Some(ctx) = context(ctx) else {
        return abi::ERR_INVALID_ARGUMENT;
    };
    if ctx.stopped.load(Ordering::SeqCst) {
        return abi::ERR_STOPPING;
    }
    // Nothing below may unwind into plugin code.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the plugin passes a message per the ABI.
        match unsafe { read_message(message) } {
            Ok(m) => ctx.side.publish(m),
            Err(code) => code,
        }
    }))
    .unwrap_or(abi::ERR_FAILED)
}

/// ABI 1.3 (rule 11): the messages the host can read go to the daemon together; one it cannot
/// read gets its code alone, the others are still queued.
unsafe extern "C" fn host_publish_batch(
    ctx: *mut c_void,
    messages: *const *const abi::Message,
    count: usize,
    results: *mut i32,
) -> i32 {
    let Some(ctx) = context(ctx) else {
        return abi::ERR_INVALID_ARGUMENT;
    };
    if count > 0 && messages.is_null() {
        return abi::ERR_INVALID_ARGUMENT;
    }
    if count > abi::MAX_BATCH {
        // Refused whole, before anything is read or queued.
        // SAFETY: `results` is NULL or has `count` entries (rule 11).
        unsafe { fill_results(results, &vec![abi::ERR_INVALID_ARGUMENT; count]) };
        return abi::ERR_INVALID_ARGUMENT;
    }
    let codes = if ctx.stopped.load(Ordering::SeqCst) {
        vec![abi::ERR_STOPPING; count]
    } else {
        // Nothing below may unwind into plugin code.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the plugin passes `count` message pointers per the ABI.
            let pointers = unsafe { std::slice::from_raw_parts(messages, count) };
            // `None`: readable, its code comes from the daemon.
            let mut codes: Vec<Option<i32>> = Vec::with_capacity(count);
            let mut readable = Vec::with_capacity(count);
            for &message in pointers {
                // SAFETY: each message is borrowed for the call per the ABI.
                match unsafe { read_message(message) } {
                    Ok(m) => {
                        readable.push(m);
                        codes.push(None);
                    }
                    Err(code) => codes.push(Some(code)),
                }
            }
            let mut queued = ctx.side.publish_batch(readable).into_iter();
            codes
                .into_iter()
                .map(|c| c.unwrap_or_else(|| queued.next().unwrap_or(abi::ERR_FAILED)))
                .collect::<Vec<_>>()
        }))
        .unwrap_or_else(|_| vec![abi::ERR_FAILED; count])
    };
    // SAFETY: `results` is NULL or has `count` entries (rule 11).
    unsafe { fill_results(results, &codes) };
    codes.into_iter().find(|&c| c != abi::OK).unwrap_or(abi::OK)
}

/// # Safety
/// `results` is NULL or has room for `codes.len()` entries.
unsafe fn fill_results(results: *mut i32, codes: &[i32]) {
    if !results.is_null() {
        // SAFETY: per the function contract.
        unsafe { std::slice::from_raw_parts_mut(results, codes.len()) }.copy_from_slice(codes);
    }
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: i32, text: abi::Str) {
    let Some(ctx) = context(ctx) else { return };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: borrowed for the call per the ABI.
        let bytes = unsafe { text.as_bytes() };
        ctx.side.log(level, &String::from_utf8_lossy(bytes));
    }));
}

/// Writes `text` into a plugin's output buffer, cut at a character boundary to its capacity.
///
/// # Safety
/// `buf` is null or a host-API output buffer borrowed for the call.
unsafe fn write_out(buf: *mut abi::Buf, text: &str) {
    if buf.is_null() {
        return;
    }
    // SAFETY: per the function contract.
    let buf = unsafe { &mut *buf };
    if buf.ptr.is_null() {
        return;
    }
    let mut n = text.len().min(buf.cap);
    while n > 0 && !text.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `n <= cap` bytes fit the plugin's buffer.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.ptr, n) };
    buf.len = n;
}

/// The settings accessors: look `key` up in `settings` and hand the value to `put`.
///
/// # Safety
/// Arguments follow the ABI (borrowed for the call).
unsafe fn setting<T>(
    settings: abi::Str,
    key: abi::Str,
    error: *mut abi::Buf,
    get: impl FnOnce(&str, &str) -> Result<T, super::settings_access::Lookup>,
    put: impl FnOnce(T),
) -> i32 {
    use super::settings_access::Lookup;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: borrowed for the call per the ABI.
        let (Ok(settings), Ok(key)) = (unsafe { str_arg(settings) }, unsafe { str_arg(key) })
        else {
            // SAFETY: as above.
            unsafe { write_out(error, "the settings or the key are not UTF-8") };
            return abi::ERR_INVALID_ARGUMENT;
        };
        match get(&settings, &key) {
            Ok(v) => {
                put(v);
                abi::OK
            }
            Err(Lookup::Absent) => abi::ERR_NOT_FOUND,
            Err(Lookup::Wrong(why)) => {
                // SAFETY: as above.
                unsafe { write_out(error, &why) };
                abi::ERR_INVALID_ARGUMENT
            }
        }
    }))
    .unwrap_or(abi::ERR_FAILED)
}

unsafe extern "C" fn host_setting_string(
    _ctx: *mut c_void,
    settings: abi::Str,
    key: abi::Str,
    out: *mut abi::Buf,
    error: *mut abi::Buf,
) -> i32 {
    let mut fits = true;
    // SAFETY: arguments per the ABI.
    let code = unsafe {
        setting(settings, key, error, super::settings_access::string, |v| {
            if !out.is_null() && v.len() > (*out).cap {
                fits = false;
            }
            write_out(out, &v);
        })
    };
    if code == abi::OK && !fits {
        // SAFETY: as above.
        unsafe { write_out(error, "the value is longer than the buffer (it was cut)") };
        return abi::ERR_TOO_LARGE;
    }
    code
}

unsafe extern "C" fn host_setting_number(
    _ctx: *mut c_void,
    settings: abi::Str,
    key: abi::Str,
    out: *mut f64,
    error: *mut abi::Buf,
) -> i32 {
    // SAFETY: arguments per the ABI; `out` is the plugin's.
    unsafe {
        setting(settings, key, error, super::settings_access::number, |v| {
            if !out.is_null() {
                *out = v;
            }
        })
    }
}

unsafe extern "C" fn host_setting_bool(
    _ctx: *mut c_void,
    settings: abi::Str,
    key: abi::Str,
    out: *mut i32,
    error: *mut abi::Buf,
) -> i32 {
    // SAFETY: arguments per the ABI; `out` is the plugin's.
    unsafe {
        setting(settings, key, error, super::settings_access::boolean, |v| {
            if !out.is_null() {
                *out = i32::from(v);
            }
        })
    }
}

unsafe extern "C" fn host_setting_duration(
    _ctx: *mut c_void,
    settings: abi::Str,
    key: abi::Str,
    out_ms: *mut u64,
    error: *mut abi::Buf,
) -> i32 {
    // SAFETY: arguments per the ABI; `out_ms` is the plugin's.
    unsafe {
        setting(
            settings,
            key,
            error,
            super::settings_access::duration,
            |v| {
                if !out_ms.is_null() {
                    *out_ms = u64::try_from(v.as_millis()).unwrap_or(u64::MAX);
                }
            },
        )
    }
}

unsafe extern "C" fn host_report_properties(
    ctx: *mut c_void,
    properties: abi::Str,
    error: *mut abi::Buf,
) -> i32 {
    let Some(ctx) = context(ctx) else {
        return abi::ERR_INVALID_ARGUMENT;
    };
    if ctx.stopped.load(Ordering::SeqCst) {
        return abi::ERR_STOPPING;
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: borrowed for the call per the ABI.
        let checked = unsafe { str_arg(properties) }
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}")))
            .and_then(|v| super::own_reported::check(&v));
        match checked {
            Ok(map) => {
                ctx.side.report(map);
                abi::OK
            }
            Err(why) => {
                // SAFETY: as above.
                unsafe { write_out(error, &why) };
                abi::ERR_INVALID_ARGUMENT
            }
        }
    }))
    .unwrap_or(abi::ERR_FAILED)
}

unsafe extern "C" fn host_health(ctx: *mut c_void, state: i32, detail: abi::Str) {
    let Some(ctx) = context(ctx) else { return };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: borrowed for the call per the ABI.
        let bytes = unsafe { detail.as_bytes() };
        ctx.side.health(state, &String::from_utf8_lossy(bytes));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> abi::PluginDescriptor {
        abi::PluginDescriptor {
            magic: abi::MAGIC,
            abi_major: 1,
            abi_minor: 0,
            descriptor_size: abi::DESCRIPTOR_SIZE_V1_0,
            host_api_size: abi::HOST_API_SIZE_V1_0,
            message_size: abi::MESSAGE_SIZE_V1_0,
            reserved: 0,
            name: c"x".as_ptr(),
            version: c"1".as_ptr(),
            start: None,
            apply_settings: None,
            stop: None,
            methods: std::ptr::null(),
            c2d_filter: std::ptr::null(),
            invoke_method: None,
            receive_c2d: None,
        }
    }

    fn header(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        let m = if data == 2 {
            machine.to_be_bytes()
        } else {
            machine.to_le_bytes()
        };
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn libraries_of_another_architecture_are_refused_naming_both() {
        let (m, c) = HOST_MACHINE;
        assert_eq!(check_elf_header(&header(c, 1, m)), Ok(()));
        let here = machine_name(m, c);
        for (class, machine, named) in [(2, 183, "arm64"), (1, 40, "armhf"), (2, 62, "amd64")] {
            if (machine, class) == (m, c) {
                continue;
            }
            let e = check_elf_header(&header(class, 1, machine)).unwrap_err();
            assert!(e.contains(named) && e.contains(&here), "{e}");
        }
        assert!(
            check_elf_header(&header(c, 2, m))
                .unwrap_err()
                .contains("big-endian")
        );
        assert!(
            check_elf_header(b"#!/bin/sh\necho not a library\n")
                .unwrap_err()
                .contains("not an ELF")
        );
        // The agent's own executable is of the host's architecture.
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(check_elf_header(&own[..20]), Ok(()));
    }

    /// A real shared library (built here by the C compiler) whose ELF header says AArch64, or
    /// 32-bit ARM, is refused by `Library::load` with both architectures named, before dlopen
    /// (whose own error names neither).
    #[test]
    fn loading_a_library_of_another_architecture_names_both() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("empty.c");
        std::fs::write(&source, "int hubagent_arch_test_symbol;\n").unwrap();
        let built = dir.path().join("libempty.so");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&built)
            .arg(&source)
            .status()
            .expect("the C compiler runs");
        assert!(status.success(), "cc failed");
        let original = std::fs::read(&built).unwrap();
        let here = machine_name(HOST_MACHINE.0, HOST_MACHINE.1);
        for (machine, class, named) in [(183u16, 2u8, "arm64"), (40, 1, "armhf"), (62, 2, "amd64")]
        {
            if (machine, class) == HOST_MACHINE {
                continue;
            }
            let mut patched = original.clone();
            patched[4] = class;
            patched[18..20].copy_from_slice(&machine.to_le_bytes());
            let path = dir.path().join(format!("lib{named}.so"));
            std::fs::write(&path, &patched).unwrap();
            // (true: the trust check's override where not root; as root the temporary
            // directory passes it.)
            let e = Library::load(&path, true)
                .err()
                .expect("a foreign library is refused");
            assert!(
                e.contains(named) && e.contains(&format!("this agent runs on {here}")),
                "{e}"
            );
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        // The unpatched library passes the architecture check (and is refused later, for the
        // missing entry point).
        let e = Library::load(&built, true).err().expect("not a plugin");
        assert!(e.contains("exports no"), "{e}");
    }

    /// ABI 1.1's fields are read only when `descriptor_size` covers them: a 1.0 descriptor is
    /// not read past its end (its "methods" would be whatever follows it in memory).
    #[test]
    fn declarations_are_read_only_when_the_descriptor_covers_them() {
        static METHODS: &[u8] = b"open_valve\0read\0\0";
        let d = abi::PluginDescriptor {
            descriptor_size: abi::DESCRIPTOR_SIZE_V1_1,
            methods: METHODS.as_ptr().cast(),
            c2d_filter: c"{\"kind\":\"valve\"}".as_ptr(),
            invoke_method: None,
            ..good()
        };
        let e = declarations(&d).unwrap_err();
        assert!(e.contains("no invoke_method"), "{e}");
        unsafe extern "C" fn invoke(
            _: *mut c_void,
            _: abi::Str,
            _: abi::Str,
            _: *mut abi::Buf,
        ) -> i32 {
            200
        }
        unsafe extern "C" fn receive(
            _: *mut c_void,
            _: *const abi::C2dMessage,
            _: *mut abi::Buf,
        ) -> i32 {
            abi::OK
        }
        let d = abi::PluginDescriptor {
            invoke_method: Some(invoke),
            receive_c2d: Some(receive),
            ..d
        };
        let got = declarations(&d).unwrap();
        assert_eq!(got.methods, vec!["open_valve", "read"]);
        assert!(got.takes(&[("kind".into(), "valve".into())]));
        let v1_0 = abi::PluginDescriptor {
            descriptor_size: abi::DESCRIPTOR_SIZE_V1_0,
            ..d
        };
        assert_eq!(declarations(&v1_0).unwrap(), Declarations::default());
    }

    /// Two different libraries loaded one after the other into one process (in-process plugins)
    /// are two libraries: glibc's dlopen recognises an already loaded object by the name it was
    /// opened under, and each is opened as /proc/self/fd/N, so a reused fd number would hand the
    /// second plugin the first one's entry point (found by the arm64 smoke, cross-smoke.sh, with
    /// the simulated sensor and the C example both in-process).
    #[test]
    fn two_libraries_loaded_in_turn_stay_two() {
        let dir = tempfile::tempdir().unwrap();
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/examples/c-counter");
        let source = std::fs::read_to_string(format!("{example}/counter.c")).unwrap();
        let mut loaded = Vec::new();
        for name in ["first-counter", "second-counter"] {
            let renamed = source.replace(".name = \"c-counter\"", &format!(".name = \"{name}\""));
            assert_ne!(renamed, source, "counter.c names its plugin c-counter");
            let c = dir.path().join(format!("{name}.c"));
            std::fs::write(&c, renamed).unwrap();
            let built = dir.path().join(format!("lib{name}.so"));
            let status = std::process::Command::new("cc")
                .args(["-shared", "-fPIC", "-pthread", "-I"])
                .arg(format!("{example}/../../sdk/include"))
                .arg("-o")
                .arg(&built)
                .arg(&c)
                .status()
                .expect("the C compiler runs");
            assert!(status.success(), "cc failed");
            let library = Library::load(&built, true).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(library.name, name);
            loaded.push(library);
        }
    }

    #[test]
    fn descriptors_are_checked_before_use() {
        let d = good();
        assert!(check_descriptor(&d).unwrap_err().contains("lacks start"));
        let d = abi::PluginDescriptor {
            magic: 0xdead_beef,
            ..good()
        };
        assert!(check_descriptor(&d).unwrap_err().contains("magic"));
        let d = abi::PluginDescriptor {
            abi_major: 2,
            ..good()
        };
        assert!(
            check_descriptor(&d)
                .unwrap_err()
                .contains("ABI 2.0 is not supported")
        );
        let d = abi::PluginDescriptor {
            abi_minor: 9,
            ..good()
        };
        assert!(check_descriptor(&d).unwrap_err().contains("newer"));
        let d = abi::PluginDescriptor {
            message_size: 8,
            ..good()
        };
        assert!(check_descriptor(&d).unwrap_err().contains("message_size"));
    }
}
