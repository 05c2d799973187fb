"""voucher-bridge's wire formats: CloudEvents envelopes, command data and result data."""

from voucher_contracts.binding import UnusableRecord, decode_command, encode_result
from voucher_contracts.envelope import (
    CommandEnvelope,
    Outcome,
    ResultData,
    ResultEnvelope,
    UpstreamReport,
    content_hash,
    result_id,
    result_type,
)

__all__ = [
    "CommandEnvelope",
    "Outcome",
    "ResultData",
    "ResultEnvelope",
    "UnusableRecord",
    "UpstreamReport",
    "content_hash",
    "decode_command",
    "encode_result",
    "result_id",
    "result_type",
]
