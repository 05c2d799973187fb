#!/usr/bin/env bash
# TEST STAND-IN for Kafka's kafka-broker-api-versions.sh.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
