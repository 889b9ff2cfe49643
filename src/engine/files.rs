//! Opening files of a model folder: regular files only.
//!
//! A model folder is user data. A FIFO, a device or a socket named like a config or a
//! weight file would block whoever reads it (a FIFO's open waits for a writer) or never
//! end (`/dev/zero`), so every file is opened without blocking and checked through the
//! open handle before a byte is read: no window between the check and the read.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::engine::error::{EngineError, Result};

/// The largest text file (config, vocabulary, merges) read into memory.
pub const MAX_TEXT_FILE_BYTES: u64 = 64 << 20;

fn io_error(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens `path` for reading if it is a regular file (after following symlinks); any
/// other kind of file is refused without waiting on it.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    // O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; for a
    // regular file the flag changes nothing.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", describe(kind)),
        ));
    }
    Ok(file)
}

fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "a special file"
    }
}

/// Opens a model file as [`open_regular`] does, naming it in the error.
pub fn open_model_file(path: &Path) -> Result<File> {
    open_regular(path).map_err(|e| io_error(path, e))
}

/// The bytes of a regular text-sized file (at most [`MAX_TEXT_FILE_BYTES`]).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let file = open_model_file(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_TEXT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    if bytes.len() as u64 > MAX_TEXT_FILE_BYTES {
        return Err(io_error(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {} MiB", MAX_TEXT_FILE_BYTES >> 20),
            ),
        ));
    }
    Ok(bytes)
}

/// The text of a regular file (at most [`MAX_TEXT_FILE_BYTES`], UTF-8).
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_bytes(path)?).map_err(|_| {
        io_error(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        )
    })
}

/// Reads a JSON config file into `T`, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("config.json");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = read_text(&fifo).expect_err("a FIFO");
        assert!(
            error.to_string().contains("not a regular file (a FIFO)"),
            "{error}"
        );
        let error = read_text(Path::new("/dev/zero")).expect_err("a device");
        assert!(error.to_string().contains("a device"), "{error}");
        let error = read_text(dir.path()).expect_err("a folder");
        assert!(error.to_string().contains("a folder"), "{error}");
    }

    #[test]
    fn text_files_are_read_whole_up_to_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{\"a\": 1}").expect("write");
        assert_eq!(read_text(&path).expect("read"), "{\"a\": 1}");
        let file = File::create(&path).expect("create");
        file.set_len(MAX_TEXT_FILE_BYTES + 1).expect("sparse");
        let error = read_text(&path).expect_err("too large");
        assert!(error.to_string().contains("larger than 64 MiB"), "{error}");
    }
}
