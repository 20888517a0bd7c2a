//! Subshells (JEP 91): `create_subshell_request`, `delete_subshell_request` and
//! `list_subshell_request` on control. A subshell is a lane of its own in the supervisor,
//! and a named thread in the main worker (created by the worker on first use).

use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::*;
use crate::ipc_ops::ToWorker;

impl Kernel {
    pub(super) async fn create_subshell(&mut self, msg: Incoming) {
        let id = self.lanes.create_subshell();
        info!(subshell_id = %id, "subshell created");
        let reply = json!({"status": "ok", "subshell_id": id});
        self.answer(Channel::Control, &msg, reply.to_string().as_bytes())
            .await;
    }

    /// Deletes a subshell: its queued cells are aborted, its worker thread is dropped once
    /// its running cell (if any) is done.
    pub(super) async fn delete_subshell(&mut self, msg: Incoming) {
        #[derive(Deserialize)]
        struct Content {
            subshell_id: String,
        }
        let Ok(Content { subshell_id }) = serde_json::from_slice(&msg.content) else {
            let evalue = "delete_subshell_request needs a subshell_id string".to_string();
            self.refuse(Channel::Control, &msg, "ValueError", evalue)
                .await;
            return;
        };
        let Some(queued) = self.lanes.delete_subshell(&subshell_id) else {
            let evalue = format!("no subshell with id {subshell_id:?}");
            self.refuse(Channel::Control, &msg, "UnknownSubshellError", evalue)
                .await;
            return;
        };
        info!(subshell_id = %subshell_id, aborted = queued.len(), "subshell deleted");
        self.abort(queued).await;
        if let Some(w) = self.pool.main() {
            let name = thread_name(&subshell_id);
            w.send_aux(ToWorker::DropThread { name: &name }.message());
        }
        self.answer(Channel::Control, &msg, br#"{"status":"ok"}"#)
            .await;
    }

    pub(super) async fn list_subshells(&mut self, msg: Incoming) {
        let reply = json!({"status": "ok", "subshell_id": self.lanes.subshell_ids()});
        self.answer(Channel::Control, &msg, reply.to_string().as_bytes())
            .await;
    }
}

/// The worker thread that runs a subshell's cells.
pub(super) fn thread_name(subshell_id: &str) -> String {
    format!("subshell-{subshell_id}")
}
