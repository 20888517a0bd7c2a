//! The event-loop backend of the workers' main thread (asyncio or trio): a CLI value, a
//! kernelspec choice and an IPC field.

/// Event-loop library the worker runs user code under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The standard library's asyncio (the default).
    #[default]
    Asyncio,
    /// Trio.
    Trio,
}

impl Backend {
    /// The spelling used on the command line (`asyncio` / `trio`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Asyncio => "asyncio",
            Backend::Trio => "trio",
        }
    }
}
