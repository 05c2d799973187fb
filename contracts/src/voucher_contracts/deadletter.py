"""Headers a dead letter carries besides the original record's own (kept as they were)."""

REASON = (
    "x-dlq-reason"  # machine-readable: not_json, missing_attribute, unknown_type, too_large, ...
)
DETAIL = "x-dlq-detail"  # human-readable detail
FAILED_AT = "x-dlq-failed-at"  # ISO 8601 UTC
ORIGINAL_TOPIC = "x-dlq-original-topic"
ORIGINAL_PARTITION = "x-dlq-original-partition"
ORIGINAL_OFFSET = "x-dlq-original-offset"
ORIGINAL_TIMESTAMP = "x-dlq-original-timestamp"  # the record's timestamp, ms since the epoch
ORIGINAL_GROUP = "x-dlq-original-group"  # the consumer group that read it
# Set when the record, byte for byte with these headers, was more than the broker takes: the
# dead letter then has no value and none of the original headers; this says what was left out.
OMITTED = "x-dlq-omitted"

# The reasons the service gives (binding.py and the pipeline); more may be added.
REASONS = (
    "too_large",  # more than MAX_RECORD_BYTES
    "empty_value",  # no value and no ce_ headers
    "not_json",
    "too_deep",  # JSON nested deeper than binding.MAX_JSON_DEPTH
    "not_a_cloudevent",  # JSON, but not an object with specversion
    "invalid_header",  # a ce_ header that is not UTF-8
    "unsupported_specversion",
    "missing_attribute",  # id, source, type or subject missing or blank
    "invalid_attribute",
    "unknown_type",  # not a command type of this topic
    "result_refused",  # a command whose result the broker refused, even compact
    "internal_error",  # decoding failed on a bug
)
