//! `CellPlan::parse` on an arbitrary execute_request content and metadata (separated by
//! `\0\0`): it never panics, and decides the same way twice; the `execute_input` built
//! from the content is valid JSON holding the content's own code.
#![no_main]

use kernelvisor_fuzz::cell_plan::{execute_input, CellPlan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = kernelvisor_fuzz::frames(data);
    let content = &frames[0];
    let metadata = frames.get(1).map_or(&b"{}"[..], |m| m.as_ref());
    let plan = CellPlan::parse(content, metadata);
    let _ = plan.abort_on_error();
    assert_eq!(plan, CellPlan::parse(content, metadata));
    if let Some(input) = execute_input(content, 3) {
        let input: serde_json::Value = serde_json::from_slice(&input).expect("valid JSON");
        assert!(input["code"].is_string());
        assert_eq!(input["execution_count"], 3);
        // (Content that is not all valid JSON may still give its code: only `code` is read.)
        if let Ok(sent) = serde_json::from_slice::<serde_json::Value>(content) {
            assert_eq!(input["code"], sent["code"]);
        }
    }
});
