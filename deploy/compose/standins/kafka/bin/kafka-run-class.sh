#!/usr/bin/env bash
# TEST STAND-IN: runs a class of the Kafka jars, as Kafka's own kafka-run-class.sh does (the
# JVM option variables it reads: KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_OPTS,
# KAFKA_LOG4J_OPTS).
set -euo pipefail
class="$1"
shift
read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xmx256m}"
read -r -a perf <<<"${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}"
read -r -a opts <<<"${KAFKA_OPTS:-}"
read -r -a log4j <<<"${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/etc/kafka/docker/tools-log4j2.properties}"
exec java "${heap[@]}" "${perf[@]}" "${log4j[@]}" "${opts[@]}" -cp '/opt/kafka/libs/*' "$class" "$@"
