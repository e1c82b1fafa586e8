package io.libfse.example;

import java.util.OptionalDouble;
import java.util.OptionalLong;

/** A minimal JSON object writer: keys in insertion order, Python's {@code ", "}/{@code ": "}. */
final class Json {
    private final StringBuilder out = new StringBuilder("{");
    private boolean first = true;

    private Json key(String key) {
        if (!first) {
            out.append(", ");
        }
        first = false;
        string(out, key);
        out.append(": ");
        return this;
    }

    Json put(String key, String value) {
        key(key);
        if (value == null) {
            out.append("null");
        } else {
            string(out, value);
        }
        return this;
    }

    Json put(String key, long value) {
        key(key).out.append(value);
        return this;
    }

    Json put(String key, boolean value) {
        key(key).out.append(value);
        return this;
    }

    Json put(String key, double value) {
        key(key).out.append(Numbers.json(value));
        return this;
    }

    Json put(String key, OptionalDouble value) {
        key(key).out.append(value.isPresent() ? Numbers.json(value.getAsDouble()) : "null");
        return this;
    }

    Json put(String key, OptionalLong value) {
        key(key).out.append(value.isPresent() ? Long.toString(value.getAsLong()) : "null");
        return this;
    }

    /** A value already rendered as JSON (a nested object or array). */
    Json raw(String key, String json) {
        key(key).out.append(json);
        return this;
    }

    @Override
    public String toString() {
        return out + "}";
    }

    /** A JSON array of already rendered values. */
    static String array(Iterable<String> values) {
        return "[" + String.join(", ", values) + "]";
    }

    /** Appends the JSON string literal: UTF-8 text raw, control characters escaped. */
    static void string(StringBuilder out, String value) {
        out.append('"');
        for (int i = 0; i < value.length(); i++) {
            char c = value.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                case '\b' -> out.append("\\b");
                case '\f' -> out.append("\\f");
                default -> {
                    if (c < 0x20 || c == 0x7f || Character.isSurrogate(c) && !validPair(value, i)) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        out.append('"');
    }

    /** Whether the surrogate at {@code i} is half of a well-formed pair (a lone one is escaped). */
    private static boolean validPair(String s, int i) {
        char c = s.charAt(i);
        if (Character.isHighSurrogate(c)) {
            return i + 1 < s.length() && Character.isLowSurrogate(s.charAt(i + 1));
        }
        return i > 0 && Character.isHighSurrogate(s.charAt(i - 1));
    }
}
