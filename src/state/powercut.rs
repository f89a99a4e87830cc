//! Test-only SQLite VFS that simulates a power cut.
//!
//! It wraps the default `unix` VFS and passes every call through, but remembers, per file, the
//! bytes the file held at its last `xSync` (or when it was first opened, if it was never synced).
//! [`cut`] then throws away everything written since: each file under a directory is put back to
//! that image (a file never synced and absent at open is deleted) and the shared-memory index,
//! which SQLite never syncs, is removed. What the page cache held but no fsync covered is gone,
//! as after a real power loss; a database that commits without syncing loses those commits.
//!
//! Close the connections before calling [`cut`], with checkpoint-on-close disabled
//! (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`): a crash does not run that checkpoint either.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rusqlite::ffi;

/// Name under which the VFS is registered.
pub(crate) const VFS_NAME: &str = "zlayer-powercut";

/// Durable image of each file opened through the VFS: `None` when it did not exist.
static IMAGES: Mutex<BTreeMap<PathBuf, Option<Vec<u8>>>> = Mutex::new(BTreeMap::new());

/// Our file object: SQLite allocates `szOsFile` bytes, we use the head and the wrapped VFS's
/// file object follows it.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    /// The tracked path, or null for files without a name (temp files). Owned (`CString`).
    path: *mut c_char,
}

/// The wrapped VFS's file object, right after our head.
fn inner(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    f.cast::<u8>()
        .wrapping_add(std::mem::size_of::<ShimFile>())
        .cast()
}

struct Wrapped(*mut ffi::sqlite3_vfs);
// SAFETY: the pointer is to SQLite's static "unix" VFS, which lives for the whole process and
// is used only through SQLite's thread-safe calls.
unsafe impl Send for Wrapped {}
// SAFETY: as above; the pointer is never written through.
unsafe impl Sync for Wrapped {}

static UNIX: OnceLock<Wrapped> = OnceLock::new();

fn unix() -> *mut ffi::sqlite3_vfs {
    UNIX.get().expect("powercut VFS not registered").0
}

/// Registers the VFS (once per process) and returns its name.
pub(crate) fn register() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let name = CString::new("unix").unwrap();
        // SAFETY: looking up a built-in VFS by a valid C string.
        let real = unsafe { ffi::sqlite3_vfs_find(name.as_ptr()) };
        assert!(!real.is_null(), "no unix VFS");
        UNIX.get_or_init(|| Wrapped(real));
        // SAFETY: `real` points to a valid, live sqlite3_vfs; copying the struct copies its
        // function pointers, which stay valid for the process.
        let mut vfs: ffi::sqlite3_vfs = unsafe { *real };
        let file_size = std::mem::size_of::<ShimFile>() as c_int;
        // SAFETY: as above.
        vfs.szOsFile = file_size + unsafe { (*real).szOsFile };
        vfs.pNext = std::ptr::null_mut();
        vfs.zName = CString::new(VFS_NAME).unwrap().into_raw();
        vfs.xOpen = Some(shim_open);
        vfs.xDelete = Some(shim_delete);
        let vfs = Box::into_raw(Box::new(vfs));
        // SAFETY: `vfs` is a valid VFS object that lives for the rest of the process (leaked).
        let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
        assert_eq!(rc, ffi::SQLITE_OK, "cannot register the powercut VFS");
    });
    VFS_NAME
}

/// Simulates a power cut for every file opened through the VFS under `dir`: each goes back to
/// its last synced image, a file never synced that did not exist at open is deleted, and the
/// `-shm` index files are removed.
pub(crate) fn cut(dir: &Path) {
    let mut images = IMAGES.lock().unwrap();
    let paths: Vec<PathBuf> = images
        .keys()
        .filter(|p| p.starts_with(dir))
        .cloned()
        .collect();
    assert!(
        !paths.is_empty(),
        "nothing under {} was opened",
        dir.display()
    );
    for path in paths {
        match images.remove(&path).flatten() {
            Some(bytes) => std::fs::write(&path, bytes).unwrap(),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
                _ => {}
            },
        }
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with("-shm") {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn remember(path: &Path, synced: bool) {
    let mut images = IMAGES.lock().unwrap();
    if synced || !images.contains_key(path) {
        images.insert(path.to_path_buf(), std::fs::read(path).ok());
    }
}

fn tracked(f: *mut ffi::sqlite3_file) -> Option<PathBuf> {
    // SAFETY: `f` is one of our file objects, initialised by `shim_open` before SQLite calls any
    // of its methods; `path` is null or an owned C string.
    let p = unsafe { (*f.cast::<ShimFile>()).path };
    // SAFETY: non-null `path` is a valid NUL-terminated string we allocated.
    (!p.is_null()).then(|| PathBuf::from(unsafe { CStr::from_ptr(p) }.to_string_lossy().as_ref()))
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = unix();
    // SAFETY: `real` is the live unix VFS; `file` has room for our head plus its file object
    // (`szOsFile`), and `inner(file)` is that object; the other arguments are SQLite's own.
    let rc = unsafe { ((*real).xOpen.unwrap())(real, name, inner(file), flags, out_flags) };
    let shim = file.cast::<ShimFile>();
    if rc != ffi::SQLITE_OK {
        // SAFETY: `shim` points to SQLite's allocation for this file; a null method table tells
        // SQLite not to call xClose.
        unsafe { (*shim).base.pMethods = std::ptr::null() };
        return rc;
    }
    let path = if name.is_null() {
        std::ptr::null_mut()
    } else {
        // SAFETY: a non-null name is a NUL-terminated path from SQLite.
        let s = unsafe { CStr::from_ptr(name) }.to_owned();
        remember(Path::new(s.to_string_lossy().as_ref()), false);
        s.into_raw()
    };
    // SAFETY: initialising our head in SQLite's allocation for this file.
    unsafe {
        (*shim).path = path;
        (*shim).base.pMethods = &IO;
    }
    rc
}

/// A deleted file stays deleted after the cut (SQLite syncs the directory where it matters).
unsafe extern "C" fn shim_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let real = unix();
    // SAFETY: forwarding SQLite's own arguments to the live unix VFS.
    let rc = unsafe { ((*real).xDelete.unwrap())(real, name, sync_dir) };
    if !name.is_null() {
        // SAFETY: a non-null name is a NUL-terminated path from SQLite.
        let path = PathBuf::from(unsafe { CStr::from_ptr(name) }.to_string_lossy().as_ref());
        IMAGES.lock().unwrap().insert(path, None);
    }
    rc
}

/// Calls the wrapped file's method `$m` with `$args`.
macro_rules! forward {
    ($f:expr, $m:ident $(, $arg:expr)*) => {{
        let real = inner($f);
        // SAFETY: the wrapped file was opened by the unix VFS in `shim_open`, so its method
        // table is valid for every method SQLite calls on ours.
        unsafe { ((*(*real).pMethods).$m.unwrap())(real $(, $arg)*) }
    }};
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let rc = forward!(f, xClose);
    let shim = f.cast::<ShimFile>();
    // SAFETY: `path` was made by `CString::into_raw` in `shim_open` (or is null) and is freed
    // only here, once: SQLite calls xClose once per opened file.
    unsafe {
        if !(*shim).path.is_null() {
            drop(CString::from_raw((*shim).path));
            (*shim).path = std::ptr::null_mut();
        }
    }
    rc
}

unsafe extern "C" fn x_read(f: *mut ffi::sqlite3_file, b: *mut c_void, n: c_int, o: i64) -> c_int {
    forward!(f, xRead, b, n, o)
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    b: *const c_void,
    n: c_int,
    o: i64,
) -> c_int {
    forward!(f, xWrite, b, n, o)
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    forward!(f, xTruncate, size)
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let rc = forward!(f, xSync, flags);
    if rc == ffi::SQLITE_OK
        && let Some(path) = tracked(f)
    {
        remember(&path, true);
    }
    rc
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    forward!(f, xFileSize, out)
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    forward!(f, xLock, l)
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    forward!(f, xUnlock, l)
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    forward!(f, xCheckReservedLock, out)
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    forward!(f, xFileControl, op, arg)
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    forward!(f, xSectorSize)
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    forward!(f, xDeviceCharacteristics)
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    forward!(f, xShmMap, page, size, extend, out)
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    ofs: c_int,
    n: c_int,
    fl: c_int,
) -> c_int {
    forward!(f, xShmLock, ofs, n, fl)
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    forward!(f, xShmBarrier)
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    forward!(f, xShmUnmap, delete)
}

/// Version 2: the shared-memory methods WAL needs, no memory-mapped I/O (xFetch), so every read
/// and write goes through the methods above.
static IO: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};
