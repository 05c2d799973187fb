package voucherbridge.bench;

import com.fasterxml.jackson.core.type.TypeReference;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelEoSStreamProcessor;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.zip.GZIPInputStream;
import java.util.zip.InflaterInputStream;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The benchmark's JVM peer: Confluent's Parallel Consumer as its README shows it, doing the job
 * the other bench systems do (bench/README.md).
 *
 * <p>KEY ordering (records of one terminal one after another, terminals concurrently, up to
 * {@code BENCH_PC_MAX_CONCURRENCY} = 100 at once, each on its own worker thread), {@code
 * pollAndProduce}: per record the eVOUCHER call voucher-bridge makes (same URL, {@code X-Token},
 * JSON body, the terminal's {@code OCSESSID} cookie sent back, gzip accepted) with one shared
 * {@link HttpClient}, then one small result record with the same key carrying {@code
 * data.command_id}. Parallel Consumer marks a record done only once its result is acknowledged
 * by the broker and commits offsets of done records (its default commit mode, periodic
 * asynchronous consumer commits). Settings from the same {@code BENCH_*} environment as {@code
 * bench.naive} and {@code bench.bare}.
 */
public final class ParallelConsumerPeer {
  private static final Logger log = LoggerFactory.getLogger(ParallelConsumerPeer.class);
  private static final ObjectMapper JSON = new ObjectMapper();
  private static final String SESSION_COOKIE = "OCSESSID";

  private final String resultsTopic;
  private final Map<String, String> tokens;
  private final Map<String, URI> urls;
  private final HttpClient http;
  private final Map<String, String> cookies = new ConcurrentHashMap<>(); // terminal → OCSESSID

  private ParallelConsumerPeer(String resultsTopic, String sandboxUrl, Map<String, String> tokens) {
    this.resultsTopic = resultsTopic;
    this.tokens = tokens;
    String base = sandboxUrl.replaceAll("/+$", "") + "/index.php?route=account%2F";
    this.urls =
        Map.of(
            "bill_total_api", URI.create(base + "bill_total_api"),
            "scan_voucher_api", URI.create(base + "scan_voucher_api"));
    // HTTP/1.1 as the sandbox speaks it (the default would offer an h2c upgrade on every
    // request); keep-alive connections, one per worker thread at most.
    this.http =
        HttpClient.newBuilder()
            .version(HttpClient.Version.HTTP_1_1)
            .connectTimeout(Duration.ofSeconds(5))
            .build();
  }

  /** One record: the eVOUCHER call, then the result to produce. */
  ProducerRecord<String, byte[]> handle(ConsumerRecord<String, byte[]> record) {
    try {
      JsonNode event = JSON.readTree(record.value());
      Answer answer = call(event);
      return new ProducerRecord<>(resultsTopic, record.key(), result(event, answer));
    } catch (IOException e) {
      throw new UncheckedIOException(e); // Parallel Consumer retries the record
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new IllegalStateException("interrupted", e);
    }
  }

  record Answer(int status, JsonNode payload) {}

  /** As bench.common.Upstream.call (and voucher-bridge's evoucher client) makes it. */
  Answer call(JsonNode event) throws IOException, InterruptedException {
    String terminal = event.path("subject").asText();
    JsonNode data = event.path("data");
    String route;
    String body;
    if ("pos.bill_total".equals(event.path("type").asText())) {
      route = "bill_total_api";
      // The amount as an exact JSON number, as voucher-bridge sends it.
      body =
          "{\"bill_total\":"
              + data.path("bill_total").asText()
              + ",\"machine_name\":"
              + JSON.writeValueAsString(terminal)
              + "}";
    } else {
      route = "scan_voucher_api";
      ObjectNode scan = JSON.createObjectNode();
      scan.put("voucher_code", data.path("voucher_code").asText());
      body = JSON.writeValueAsString(scan);
    }
    String token = tokens.get(terminal);
    if (token == null) {
      throw new IllegalArgumentException("no X-Token for terminal " + terminal);
    }
    HttpRequest.Builder request =
        HttpRequest.newBuilder(urls.get(route))
            .timeout(Duration.ofSeconds(15))
            .header("X-Token", token)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .header("Accept-Encoding", "gzip, deflate")
            .header("User-Agent", "voucher-bridge-bench-parallel-consumer")
            .POST(HttpRequest.BodyPublishers.ofString(body));
    String session = cookies.get(terminal);
    if (session != null) {
      request.header("Cookie", SESSION_COOKIE + "=" + session);
    }
    HttpResponse<byte[]> response =
        http.send(request.build(), HttpResponse.BodyHandlers.ofByteArray());
    for (String header : response.headers().allValues("set-cookie")) {
      int eq = header.indexOf('=');
      if (eq > 0 && header.substring(0, eq).trim().equals(SESSION_COOKIE)) {
        int end = header.indexOf(';', eq);
        String fresh = header.substring(eq + 1, end < 0 ? header.length() : end);
        if (!fresh.equals(session)) {
          cookies.put(terminal, fresh);
        }
      }
    }
    JsonNode payload = null;
    try {
      payload = JSON.readTree(decoded(response));
    } catch (IOException notJson) {
      // payload stays null, as bench.common.Upstream.call does
    }
    return new Answer(response.statusCode(), payload != null && payload.isObject() ? payload : null);
  }

  private static byte[] decoded(HttpResponse<byte[]> response) throws IOException {
    String encoding = response.headers().firstValue("content-encoding").orElse("").trim();
    InputStream raw = new ByteArrayInputStream(response.body());
    if (encoding.equalsIgnoreCase("gzip")) {
      try (InputStream in = new GZIPInputStream(raw)) {
        return in.readAllBytes();
      }
    }
    if (encoding.equalsIgnoreCase("deflate")) {
      try (InputStream in = new InflaterInputStream(raw)) {
        return in.readAllBytes();
      }
    }
    return response.body();
  }

  /** The small result event of bench.common.result_value. */
  static byte[] result(JsonNode event, Answer answer) throws IOException {
    JsonNode payload = answer.payload();
    boolean ok = payload != null && payload.path("success").asBoolean(false);
    ObjectNode out = JSON.createObjectNode();
    out.put("specversion", "1.0");
    out.put("id", UUID.randomUUID().toString());
    out.put("source", "/services/bench");
    out.put("type", event.path("type").asText() + ".result");
    out.set("subject", event.get("subject"));
    out.put("time", Instant.now().truncatedTo(ChronoUnit.SECONDS).toString());
    ObjectNode data = out.putObject("data");
    data.set("command_id", event.get("id"));
    data.put("outcome", ok ? "succeeded" : "rejected");
    data.set("message", payload == null ? null : payload.get("message"));
    data.putObject("upstream").put("last_status", answer.status());
    return JSON.writeValueAsBytes(out);
  }

  private static String env(String name) {
    String value = System.getenv(name);
    if (value == null || value.isEmpty()) {
      throw new IllegalArgumentException(name + " is not set");
    }
    return value;
  }

  public static void main(String[] args) throws Exception {
    String bootstrap = env("BENCH_BOOTSTRAP");
    Map<String, String> tokens =
        JSON.readValue(env("BENCH_TERMINALS"), new TypeReference<Map<String, String>>() {});
    int maxConcurrency =
        Integer.parseInt(System.getenv().getOrDefault("BENCH_PC_MAX_CONCURRENCY", "100"));
    ParallelConsumerPeer peer =
        new ParallelConsumerPeer(env("BENCH_RESULTS_TOPIC"), env("BENCH_SANDBOX_URL"), tokens);

    Properties consumerConfig = new Properties();
    consumerConfig.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    consumerConfig.put(ConsumerConfig.GROUP_ID_CONFIG, env("BENCH_GROUP_ID"));
    consumerConfig.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false"); // Parallel Consumer commits
    consumerConfig.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    consumerConfig.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
    consumerConfig.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    // The client's defaults otherwise: acks=all, idempotence on, no linger (kafka-clients 3.9).
    Properties producerConfig = new Properties();
    producerConfig.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    producerConfig.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
    producerConfig.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);

    ParallelConsumerOptions<String, byte[]> options =
        ParallelConsumerOptions.<String, byte[]>builder()
            .ordering(ProcessingOrder.KEY)
            .maxConcurrency(maxConcurrency)
            .consumer(new KafkaConsumer<>(consumerConfig))
            .producer(new KafkaProducer<>(producerConfig))
            .build(); // commitMode: the default, PERIODIC_CONSUMER_ASYNCHRONOUS
    ParallelEoSStreamProcessor<String, byte[]> processor = new ParallelEoSStreamProcessor<>(options);
    processor.subscribe(List.of(env("BENCH_COMMANDS_TOPIC")));
    processor.pollAndProduce(context -> peer.handle(context.getSingleConsumerRecord()));

    // SIGTERM (the bench stopping it): close, then the JVM exits. A processor that fails on its
    // own ends the process, so that the bench sees a crash, not a stall.
    AtomicBoolean stopping = new AtomicBoolean();
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  stopping.set(true);
                  processor.close();
                }));
    while (true) {
      Thread.sleep(500);
      if (!stopping.get() && processor.isClosedOrFailed()) {
        log.error("Parallel Consumer stopped", processor.getFailureCause());
        System.exit(1);
      }
    }
  }
}
