"""Headers of a record replayed from a dead-letter topic (design.md, Dead letters)."""

# Which dead letter it was: "<topic>/<partition>/<offset>".
REPLAY_OF = "x-replay-of"
# How many replays its chain has had, this one included (a dead letter of a replayed record
# keeps it among the original headers, so the count goes on).
REPLAY_COUNT = "x-replay-count"
# Every header the service adds to a dead letter starts so (all left out of a replay).
DEAD_LETTER_PREFIX = "x-dlq-"
