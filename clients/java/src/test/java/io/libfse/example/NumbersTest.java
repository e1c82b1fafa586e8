package io.libfse.example;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;

class NumbersTest {
    @Test
    void jsonIsPythonsRepr() {
        assertEquals("0.17", Numbers.json(0.17));
        assertEquals("10.0", Numbers.json(10.0));
        assertEquals("2574.2", Numbers.json(2574.2));
        assertEquals("0.0001", Numbers.json(1e-4));
        assertEquals("1e-05", Numbers.json(1e-5));
        assertEquals("1.5e-07", Numbers.json(1.5e-7));
        assertEquals("1e+16", Numbers.json(1e16));
        assertEquals("9999999999999998.0", Numbers.json(9999999999999998.0));
        assertEquals("1.2345678901234568e+17", Numbers.json(123456789012345678.0));
        assertEquals("-3.5", Numbers.json(-3.5));
        assertEquals("0.0", Numbers.json(0.0));
        assertEquals("-0.0", Numbers.json(-0.0));
        assertEquals("0.1", Numbers.json(0.1));
        assertEquals("0.30000000000000004", Numbers.json(0.1 + 0.2));
        assertEquals("5e-324", Numbers.json(Double.MIN_VALUE));
        assertEquals("1.7976931348623157e+308", Numbers.json(Double.MAX_VALUE));
        assertEquals("null", Numbers.json(Double.NaN));
        assertEquals("null", Numbers.json(Double.POSITIVE_INFINITY));
        assertEquals("null", Numbers.json(Double.NEGATIVE_INFINITY));
    }

    @Test
    void jsonRoundTripsEveryDouble() {
        SplittableRandom random = new SplittableRandom(7);
        for (int i = 0; i < 20_000; i++) {
            double x = Double.longBitsToDouble(random.nextLong());
            if (Double.isFinite(x)) {
                assertEquals(x, Double.parseDouble(Numbers.json(x)), () -> Double.toString(x));
            }
            double y = random.nextDouble() * 5000;
            assertEquals(y, Double.parseDouble(Numbers.json(y)), () -> Double.toString(y));
        }
    }

    @Test
    void g6IsCsPrintf() {
        assertEquals("2574.2", Numbers.g6(2574.2));
        assertEquals("10", Numbers.g6(10.0));
        assertEquals("3325.5", Numbers.g6(3325.4973162054544));
        assertEquals("0.313771", Numbers.g6(0.3137713789999452));
        assertEquals("1e-05", Numbers.g6(1e-5));
        assertEquals("0.0001", Numbers.g6(1e-4));
        assertEquals("0.000123457", Numbers.g6(0.0001234567));
        assertEquals("1.23457e+06", Numbers.g6(1234567));
        assertEquals("100000", Numbers.g6(100000));
        assertEquals("1e+06", Numbers.g6(999999.5));
        assertEquals("-2.5", Numbers.g6(-2.5));
        assertEquals("0", Numbers.g6(0));
        assertEquals("inf", Numbers.g6(Double.POSITIVE_INFINITY));
        assertEquals("nan", Numbers.g6(Double.NaN));
    }
}
