//! The `sdxld` binary as the CLI tests run it.

use std::ffi::OsStr;
use std::process::{Command, Output};

/// One invocation of `sdxld`.
pub struct Sdxld(Command);

/// `sdxld <subcommand>`; `generate` and `bench` run on the CPU.
pub fn sdxld(subcommand: &str) -> Sdxld {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdxld"));
    command.arg(subcommand);
    if matches!(subcommand, "generate" | "bench") {
        command.args(["--device", "cpu"]);
    }
    Sdxld(command)
}

impl Sdxld {
    /// One more argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.0.arg(arg);
        self
    }

    /// More arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.0.args(args);
        self
    }

    /// A flag and its value (a path, say).
    pub fn flag(self, name: &str, value: impl AsRef<OsStr>) -> Self {
        self.arg(name).arg(value)
    }

    fn output(mut self) -> Output {
        self.0.output().expect("sdxld runs")
    }

    /// Runs it and returns its standard output, failing the test (with its standard
    /// error) when it does not succeed.
    pub fn succeeds(self) -> String {
        let out = self.output();
        assert!(
            out.status.success(),
            "sdxld failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs it and returns its standard error, failing the test when it succeeds or
    /// panics.
    pub fn fails(self) -> String {
        let out = self.output();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "sdxld succeeded: {stderr}");
        assert!(!stderr.contains("panicked"), "sdxld panicked: {stderr}");
        stderr
    }
}
