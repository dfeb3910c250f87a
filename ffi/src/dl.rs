//! A tiny run-time loader over libc's `dlopen`/`dlsym`/`dlvsym`, the way NCCL's ibvwrap loads
//! libibverbs: hacserve has no build-time dependency on rdma-core and does not link to it; the
//! libraries are opened when an RDMA role starts, and a machine without them gets an error
//! that names the library, never a panic.
//!
//! A [`Library`] is never closed: function pointers resolved from it stay valid for the rest of
//! the process (the loaders keep them in a `OnceLock`, and rdma-core itself does not support
//! being unloaded while objects it created are alive).

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;

use thiserror::Error;

/// Opening a shared library or resolving one of its symbols failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DlError {
    /// `dlopen` failed for every soname tried.
    #[error("{library} not found (is {package} installed?): {detail}")]
    NotFound {
        /// The sonames tried, joined with " or ".
        library: String,
        /// The distribution package that provides it, e.g. "rdma-core".
        package: &'static str,
        /// `dlerror()` text of the last attempt.
        detail: String,
    },
    /// The library opened but a required symbol is missing.
    #[error("{library}: symbol {symbol} not found: {detail}")]
    MissingSymbol {
        library: String,
        symbol: String,
        /// `dlerror()` text (and the symbol version asked for, if any).
        detail: String,
    },
}

/// `dlerror()` text, or `fallback` when there is none.
fn last_dlerror(fallback: &str) -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by libc (thread-local in
    // glibc) that stays valid until the next dl* call on this thread; we copy it at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        fallback.to_owned()
    } else {
        // SAFETY: non-null dlerror result is a valid C string (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// An opened shared library (never closed, see the module docs).
#[derive(Debug)]
pub struct Library {
    handle: NonNull<c_void>,
    soname: &'static str,
}

// SAFETY: a dlopen handle is a process-global token; dlsym/dlvsym on it are thread-safe.
unsafe impl Send for Library {}
// SAFETY: as above; the handle is never mutated or closed.
unsafe impl Sync for Library {}

impl Library {
    /// Opens the first of `sonames` that `dlopen(RTLD_NOW | RTLD_LOCAL)` accepts. `package`
    /// names what to install when none does (it goes into the error text).
    pub fn open(sonames: &[&'static str], package: &'static str) -> Result<Library, DlError> {
        let mut detail = String::from("no soname given");
        for &soname in sonames {
            let Ok(c) = CString::new(soname) else {
                detail = format!("{soname:?} contains a NUL byte");
                continue;
            };
            // SAFETY: c is a NUL-terminated path; RTLD_NOW resolves every relocation now, so a
            // broken library fails here rather than at a later call. Running the library's
            // constructors is the documented cost of loading it.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            match NonNull::new(handle) {
                Some(handle) => return Ok(Library { handle, soname }),
                None => detail = last_dlerror("dlopen failed"),
            }
        }
        Err(DlError::NotFound {
            library: sonames.join(" or "),
            package,
            detail,
        })
    }

    /// The soname that was opened.
    pub fn soname(&self) -> &'static str {
        self.soname
    }

    /// The raw address of `name`, asking first for symbol version `version` (e.g.
    /// "IBVERBS_1.1", as NCCL does, so an old ABI of the same name is never picked) and then
    /// for the default version. `None` when absent.
    fn address(&self, name: &str, version: Option<&str>) -> Result<*mut c_void, String> {
        let c_name = CString::new(name).map_err(|_| format!("{name:?} contains a NUL byte"))?;
        if let Some(v) = version {
            let c_ver = CString::new(v).map_err(|_| format!("{v:?} contains a NUL byte"))?;
            if let Some(p) = self.dlvsym(&c_name, &c_ver) {
                return Ok(p);
            }
        }
        // SAFETY: clears any stale error so the dlerror() below belongs to this dlsym.
        unsafe { libc::dlerror() };
        // SAFETY: the handle is open (never closed) and c_name is NUL-terminated.
        let p = unsafe { libc::dlsym(self.handle.as_ptr(), c_name.as_ptr()) };
        if p.is_null() {
            let err = last_dlerror("symbol is null");
            Err(match version {
                Some(v) => format!("{err} (also tried version {v})"),
                None => err,
            })
        } else {
            Ok(p)
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn dlvsym(&self, name: &CStr, version: &CStr) -> Option<*mut c_void> {
        // SAFETY: the handle is open (never closed); both strings are NUL-terminated.
        let p = unsafe {
            libc::dlvsym(
                self.handle.as_ptr(),
                name.as_ptr() as *const c_char,
                version.as_ptr() as *const c_char,
            )
        };
        (!p.is_null()).then_some(p)
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn dlvsym(&self, _name: &CStr, _version: &CStr) -> Option<*mut c_void> {
        None
    }

    /// Resolves `name` (see [`Library::address`] for `version`) as a value of type `T`.
    ///
    /// # Safety
    /// `T` must be a pointer-sized type that correctly describes the symbol, normally an
    /// `unsafe extern "C" fn(...)` with the C prototype's exact signature.
    pub unsafe fn sym<T: Copy>(&self, name: &str, version: Option<&str>) -> Result<T, DlError> {
        const { assert!(std::mem::size_of::<T>() == std::mem::size_of::<*mut c_void>()) };
        let p = self
            .address(name, version)
            .map_err(|detail| DlError::MissingSymbol {
                library: self.soname.to_owned(),
                symbol: name.to_owned(),
                detail,
            })?;
        // SAFETY: sizes match (asserted above); the caller guarantees T describes the symbol.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }

    /// Like [`Library::sym`] but `None` when the symbol is absent (an optional entry point
    /// that only newer library versions export).
    ///
    /// # Safety
    /// As for [`Library::sym`].
    pub unsafe fn sym_opt<T: Copy>(&self, name: &str, version: Option<&str>) -> Option<T> {
        // SAFETY: forwarded to the caller.
        unsafe { self.sym(name, version) }.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_names_it_and_the_package() {
        let err = Library::open(&["libhacserve-does-not-exist.so.1"], "rdma-core").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("libhacserve-does-not-exist.so.1 not found (is rdma-core installed?)"),
            "{text}"
        );
        assert!(text.contains("cannot open shared object file"), "{text}");
    }

    #[test]
    fn libc_symbols_resolve_and_missing_ones_are_named() {
        let lib = Library::open(&["libhacserve-nope.so", "libc.so.6"], "libc6").unwrap();
        assert_eq!(lib.soname(), "libc.so.6");
        type Strlen = unsafe extern "C" fn(*const c_char) -> usize;
        // SAFETY: strlen's prototype is size_t strlen(const char *).
        let strlen: Strlen = unsafe { lib.sym("strlen", None) }.unwrap();
        // SAFETY: a NUL-terminated literal.
        assert_eq!(unsafe { strlen(c"hello".as_ptr()) }, 5);
        // A version that does not exist falls back to the default version.
        // SAFETY: as above.
        let strlen2: Strlen = unsafe { lib.sym("strlen", Some("NOPE_9.9")) }.unwrap();
        assert_eq!(strlen2 as usize, strlen as usize);
        // SAFETY: never called.
        let err =
            unsafe { lib.sym::<Strlen>("hacserve_no_such_fn", Some("GLIBC_2.2.5")) }.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("libc.so.6: symbol hacserve_no_such_fn not found"),
            "{text}"
        );
        assert!(text.contains("GLIBC_2.2.5"), "{text}");
        // SAFETY: never called.
        assert!(unsafe { lib.sym_opt::<Strlen>("hacserve_no_such_fn", None) }.is_none());
    }
}
