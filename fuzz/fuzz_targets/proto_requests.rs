//! Every request message of the gRPC API, decoded from any bytes (the first byte picks the
//! message): prost answers a message or an error, never a panic; a decoded message encodes
//! back, decodes again, and keeps its size.
#![no_main]

use cascade_orchestrator::api::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default>(bytes: &[u8]) {
    if let Ok(m) = M::decode(bytes) {
        // Compared by length: a map field is encoded in its hash map's order, which differs
        // between two equal maps, and a double may be a NaN, which equals nothing.
        let encoded = m.encode_to_vec();
        let again = M::decode(encoded.as_slice()).expect("its own encoding decodes");
        assert_eq!(encoded.len(), again.encoded_len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 19 {
        0 => round_trip::<pb::SubmitJobRequest>(bytes),
        1 => round_trip::<pb::GetJobRequest>(bytes),
        2 => round_trip::<pb::WatchJobRequest>(bytes),
        3 => round_trip::<pb::ListJobsRequest>(bytes),
        4 => round_trip::<pb::CancelJobRequest>(bytes),
        5 => round_trip::<pb::RaiseJobBudgetRequest>(bytes),
        6 => round_trip::<pb::ListGraphsRequest>(bytes),
        7 => round_trip::<pb::GetGraphRequest>(bytes),
        8 => round_trip::<pb::WatchGraphRequest>(bytes),
        9 => round_trip::<pb::GetAuditCheckpointRequest>(bytes),
        10 => round_trip::<pb::ProveAuditRecordRequest>(bytes),
        11 => round_trip::<pb::ExportAuditRequest>(bytes),
        12 => round_trip::<pb::ListApprovalsRequest>(bytes),
        13 => round_trip::<pb::GetApprovalRequest>(bytes),
        14 => round_trip::<pb::ResolveApprovalRequest>(bytes),
        15 => round_trip::<pb::ReloadGraphsRequest>(bytes),
        // The messages requests carry inside them.
        16 => round_trip::<pb::Budget>(bytes),
        17 => round_trip::<prost_types::Duration>(bytes),
        _ => round_trip::<pb::Job>(bytes),
    }
});
