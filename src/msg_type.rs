//! Jupyter message types the supervisor routes, as an enum with a validated fallback, and
//! the one rule that names a reply (`X_request` → `X_reply`).

/// A client message's `msg_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsgType {
    /// `kernel_info_request` (shell or control).
    KernelInfoRequest,
    /// `shutdown_request` (shell or control).
    ShutdownRequest,
    /// `interrupt_request` (control).
    InterruptRequest,
    /// `execute_request` (shell).
    ExecuteRequest,
    /// `complete_request` (shell; answered on the worker's `aux`).
    CompleteRequest,
    /// `inspect_request`.
    InspectRequest,
    /// `is_complete_request`.
    IsCompleteRequest,
    /// `history_request`.
    HistoryRequest,
    /// `comm_info_request`.
    CommInfoRequest,
    /// `comm_open` (shell; on the worker's `main`, in order with cells).
    CommOpen,
    /// `comm_msg`.
    CommMsg,
    /// `comm_close`.
    CommClose,
    /// `input_reply` (stdin).
    InputReply,
    /// `debug_request` (control; the worker's `aux`, so it is answered at a breakpoint).
    DebugRequest,
    /// `create_subshell_request` (control, JEP 91).
    CreateSubshellRequest,
    /// `delete_subshell_request`.
    DeleteSubshellRequest,
    /// `list_subshell_request`.
    ListSubshellRequest,
    /// `kernelvisor_info_request` (control): the pool's and snapshots' state.
    KernelvisorInfoRequest,
    /// Anything else (headers built from it are JSON-escaped).
    Other(String),
}

const KNOWN: &[(&str, MsgType)] = &[
    ("kernel_info_request", MsgType::KernelInfoRequest),
    ("shutdown_request", MsgType::ShutdownRequest),
    ("interrupt_request", MsgType::InterruptRequest),
    ("execute_request", MsgType::ExecuteRequest),
    ("complete_request", MsgType::CompleteRequest),
    ("inspect_request", MsgType::InspectRequest),
    ("is_complete_request", MsgType::IsCompleteRequest),
    ("history_request", MsgType::HistoryRequest),
    ("comm_info_request", MsgType::CommInfoRequest),
    ("comm_open", MsgType::CommOpen),
    ("comm_msg", MsgType::CommMsg),
    ("comm_close", MsgType::CommClose),
    ("input_reply", MsgType::InputReply),
    ("debug_request", MsgType::DebugRequest),
    ("create_subshell_request", MsgType::CreateSubshellRequest),
    ("delete_subshell_request", MsgType::DeleteSubshellRequest),
    ("list_subshell_request", MsgType::ListSubshellRequest),
    ("kernelvisor_info_request", MsgType::KernelvisorInfoRequest),
];

impl MsgType {
    /// Classifies a header's `msg_type`.
    pub fn parse(s: &str) -> MsgType {
        match KNOWN.iter().find(|(name, _)| *name == s) {
            Some((_, t)) => t.clone(),
            None => MsgType::Other(s.to_owned()),
        }
    }

    /// Its wire name.
    pub fn as_str(&self) -> &str {
        match self {
            MsgType::Other(s) => s,
            known => KNOWN
                .iter()
                .find(|(_, t)| t == known)
                .map(|(name, _)| *name)
                .unwrap_or("<invalid>"),
        }
    }

    /// The type of its reply: `X_reply` for `X_request`; `None` for messages that have
    /// no reply (comm messages, `input_reply`, anything not named `_request`).
    pub fn reply_type(&self) -> Option<String> {
        self.as_str()
            .strip_suffix("_request")
            .map(|base| format!("{base}_reply"))
    }

    /// Shell requests a worker answers on its `aux` connection, even while a cell runs.
    pub fn is_aux_request(&self) -> bool {
        matches!(
            self,
            MsgType::CompleteRequest
                | MsgType::InspectRequest
                | MsgType::IsCompleteRequest
                | MsgType::HistoryRequest
                | MsgType::CommInfoRequest
        )
    }

    /// Comm messages: for the worker's event loop (`main`), in order with cells.
    pub fn is_comm(&self) -> bool {
        matches!(
            self,
            MsgType::CommOpen | MsgType::CommMsg | MsgType::CommClose
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_replies_are_derived_once() {
        for (name, t) in KNOWN {
            assert_eq!(MsgType::parse(name), *t);
            assert_eq!(t.as_str(), *name);
        }
        assert_eq!(
            MsgType::ExecuteRequest.reply_type().as_deref(),
            Some("execute_reply")
        );
        assert_eq!(MsgType::CommMsg.reply_type(), None);
        assert_eq!(
            MsgType::parse("foo_request").reply_type().as_deref(),
            Some("foo_reply")
        );
        assert_eq!(
            MsgType::parse("bad\"type_request").reply_type().as_deref(),
            Some("bad\"type_reply"),
            "escaped where it is written into a header"
        );
    }
}
