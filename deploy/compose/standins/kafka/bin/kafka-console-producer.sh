#!/usr/bin/env bash
# TEST STAND-IN for Kafka's kafka-console-producer.sh.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.ConsoleProducer "$@"
