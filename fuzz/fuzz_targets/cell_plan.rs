//! `CellPlan::parse` on an arbitrary execute_request content and metadata (separated by
//! `\0\0`): it never panics, and decides the same way twice.
#![no_main]

use kernelvisor_fuzz::cell_plan::CellPlan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = kernelvisor_fuzz::frames(data);
    let content = &frames[0];
    let metadata = frames.get(1).map_or(&b"{}"[..], |m| m.as_ref());
    let plan = CellPlan::parse(content, metadata);
    let _ = plan.abort_on_error();
    assert_eq!(plan, CellPlan::parse(content, metadata));
});
