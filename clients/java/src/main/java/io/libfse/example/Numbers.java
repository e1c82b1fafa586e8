package io.libfse.example;

import java.math.BigDecimal;
import java.math.MathContext;
import java.math.RoundingMode;

/** Number formats of the contract: JSON's shortest round-trip doubles and C's {@code %.6g}. */
final class Numbers {
    private Numbers() {
    }

    /** Significant digits and decimal exponent of a finite, non-zero double: d.ddd x 10^exp. */
    private record Decimal(boolean negative, String digits, int exponent) {
        static Decimal of(double value, int precision) {
            BigDecimal rounded = new BigDecimal(value).round(new MathContext(precision, RoundingMode.HALF_EVEN));
            String digits = rounded.unscaledValue().abs().toString();
            int exponent = digits.length() - 1 - rounded.scale();
            return new Decimal(value < 0, digits, exponent);
        }

        String stripped() {
            int end = digits.length();
            while (end > 1 && digits.charAt(end - 1) == '0') {
                end--;
            }
            return digits.substring(0, end);
        }
    }

    /**
     * The double as JSON: the fewest significant digits that parse back to the same double,
     * laid out as Python's {@code repr} does (fixed for 1e-4 <= |x| < 1e16, else exponent);
     * NaN and infinities are {@code null}.
     */
    static String json(double value) {
        if (Double.isNaN(value) || Double.isInfinite(value)) {
            return "null";
        }
        if (value == 0) {
            return 1 / value < 0 ? "-0.0" : "0.0";
        }
        Decimal d = null;
        for (int precision = 1; precision <= 17; precision++) {
            d = Decimal.of(value, precision);
            if (Double.parseDouble(scientific(d.stripped(), d.exponent())) == Math.abs(value)) {
                break;
            }
        }
        String digits = d.stripped();
        String sign = d.negative() ? "-" : "";
        int exp = d.exponent();
        if (exp < -4 || exp >= 16) {
            String mantissa = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
            return sign + mantissa + exponentSuffix(exp);
        }
        return sign + fixed(digits, exp, true);
    }

    /** C's {@code printf("%.6g", value)}. */
    static String g6(double value) {
        return g(value, 6);
    }

    /** C's {@code printf("%.Pg", value)}: P significant digits, trailing zeros removed. */
    static String g(double value, int precision) {
        if (Double.isNaN(value)) {
            return "nan";
        }
        if (Double.isInfinite(value)) {
            return value > 0 ? "inf" : "-inf";
        }
        if (value == 0) {
            return 1 / value < 0 ? "-0" : "0";
        }
        Decimal d = Decimal.of(value, precision);
        String sign = d.negative() ? "-" : "";
        String digits = d.stripped();
        int exp = d.exponent();
        if (exp < -4 || exp >= precision) {
            String mantissa = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
            return sign + mantissa + exponentSuffix(exp);
        }
        return sign + fixed(digits, exp, false);
    }

    private static String exponentSuffix(int exp) {
        return "e" + (exp < 0 ? "-" : "+") + (Math.abs(exp) < 10 ? "0" : "") + Math.abs(exp);
    }

    /** digits x 10^exp in positional notation; {@code pointZero} keeps a ".0" on integers. */
    private static String fixed(String digits, int exp, boolean pointZero) {
        StringBuilder out = new StringBuilder();
        if (exp < 0) {
            out.append("0.").append("0".repeat(-exp - 1)).append(digits);
        } else if (digits.length() <= exp + 1) {
            out.append(digits).append("0".repeat(exp + 1 - digits.length()));
            if (pointZero) {
                out.append(".0");
            }
        } else {
            out.append(digits, 0, exp + 1).append('.').append(digits.substring(exp + 1));
        }
        return out.toString();
    }

    private static String scientific(String digits, int exp) {
        return digits.charAt(0) + "." + (digits.length() > 1 ? digits.substring(1) : "0") + "e" + exp;
    }
}
