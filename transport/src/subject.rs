//! Subject names. Every subject Baton publishes or subscribes to is built here.
//!
//! | subject | kind | who publishes | who consumes |
//! |---|---|---|---|
//! | `baton.start.<workflow_type>` | core request/reply | clients | orchestrator |
//! | `baton.api.<verb>` | core request/reply | clients | orchestrator |
//! | `baton.api.search` | core request/reply | clients | the index owner (`baton worker --queue index`, `baton dev`) |
//! | `baton.task.<queue>.<run_id>.<seq>.<attempt>` | JetStream `BATON_TASKS` | orchestrator | workers of `<queue>` |
//! | `baton.report.<run_id>` | core request/reply (answered once journaled) | workers | orchestrator |
//! | `baton.history.log.<writer>` | JetStream `BATON_HISTORY` (one message per group commit) | orchestrator journal | its reconciliation, readers |

/// Prefix of start requests: `baton.start.<workflow_type>`.
pub const START_PREFIX: &str = "baton.start";
/// Wildcard the orchestrator subscribes to for starts.
pub const START_ALL: &str = "baton.start.*";
/// API: wait for / read a workflow result.
pub const API_RESULT: &str = "baton.api.result";
/// API: describe one workflow.
pub const API_DESCRIBE: &str = "baton.api.describe";
/// API: the journal of one workflow.
pub const API_HISTORY: &str = "baton.api.history";
/// API: deliver a signal.
pub const API_SIGNAL: &str = "baton.api.signal";
/// API: query a workflow.
pub const API_QUERY: &str = "baton.api.query";
/// API: list workflows.
pub const API_LIST: &str = "baton.api.list";
/// Request cancellation of a workflow: `{workflow_id, reason?}` -> `{workflow_id, run_id}`.
pub const API_CANCEL: &str = "baton.api.cancel";
/// Terminate a workflow (close it without running its code): `{workflow_id, reason?}`.
pub const API_TERMINATE: &str = "baton.api.terminate";
/// API: search the document index. Served by the process that owns the vector index,
/// not by the orchestrator (which leaves it unanswered).
pub const API_SEARCH: &str = "baton.api.search";
/// Wildcard the orchestrator subscribes to for API calls.
pub const API_ALL: &str = "baton.api.*";

/// Name of the JetStream stream holding activity tasks (work-queue retention).
pub const TASKS_STREAM: &str = "BATON_TASKS";
/// Name of the JetStream stream that held activity reports before they became requests
/// to the orchestrator; deleted where it still exists (it would capture the requests).
pub const LEGACY_REPORTS_STREAM: &str = "BATON_REPORTS";
/// Name of the JetStream stream mirroring every execution's journal.
pub const HISTORY_STREAM: &str = "BATON_HISTORY";

/// Subject of a start request for a workflow type.
pub fn start(workflow_type: &str) -> String {
    format!("{START_PREFIX}.{workflow_type}")
}

/// The workflow type named by a start subject, if it is one.
pub fn workflow_type_of_start(subject: &str) -> Option<&str> {
    subject
        .strip_prefix(START_PREFIX)?
        .strip_prefix('.')
        .filter(|t| !t.is_empty() && !t.contains('.'))
}

/// Subject of one activity task. Unique per (run, activity sequence, attempt), so that the
/// orchestrator can ask JetStream whether a task is still queued after a crash.
pub fn task(queue: &str, run_id: &str, seq: u32, attempt: u32) -> String {
    format!("baton.task.{queue}.{run_id}.{seq}.{attempt}")
}

/// Filter subject of a queue's consumer.
pub fn task_filter(queue: &str) -> String {
    format!("baton.task.{queue}.>")
}

/// Prefix of report requests: `baton.report.<run_id>`.
pub const REPORT_PREFIX: &str = "baton.report";
/// Wildcard the orchestrator subscribes to for reports.
pub const REPORT_ALL: &str = "baton.report.*";

/// Subject of a report for a run.
pub fn report(run_id: &str) -> String {
    format!("{REPORT_PREFIX}.{run_id}")
}

/// An orchestrator node announces here (core NATS; payload: its journal's mirror subject, empty when unmirrored) that
/// it has started answering reports: a worker waiting for the answer to a report that a
/// node which died took asks again at once instead of after its answer wait.
pub const ORCHESTRATOR_STARTED: &str = "baton.orchestrator.started";

/// Subject of a journal writer's mirror: its group commits, in order.
pub fn journal_log(writer: &str) -> String {
    format!("baton.history.log.{writer}")
}

/// Filter of every message of every journal mirror.
pub const HISTORY_ALL: &str = "baton.history.>";

/// Durable consumer name of a task queue.
pub fn queue_consumer(queue: &str) -> String {
    format!("queue-{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_subject_round_trips() {
        assert_eq!(
            workflow_type_of_start(&start("batch_embed")),
            Some("batch_embed")
        );
        assert_eq!(workflow_type_of_start("baton.start."), None);
        assert_eq!(workflow_type_of_start("baton.start.a.b"), None);
        assert_eq!(workflow_type_of_start("baton.api.result"), None);
    }

    #[test]
    fn task_subjects_fall_under_their_queue_filter() {
        let s = task("gpu", "r1", 3, 2);
        assert_eq!(s, "baton.task.gpu.r1.3.2");
        assert!(s.starts_with(task_filter("gpu").trim_end_matches('>')));
    }
}
