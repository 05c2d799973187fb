#!/usr/bin/env bash
# TEST STAND-IN for Kafka's kafka-storage.sh.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
