/* For tests/test_entry.py only: each line of stdin (hex, possibly empty) -> its sha256 (hex). */
#include <stdio.h>
#include <string.h>

#include "sha256.h"

int main(void) {
    static char line[1 << 16];
    static unsigned char data[1 << 15];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strcspn(line, "\n") / 2;
        for (size_t i = 0; i < n; i++) {
            unsigned v;
            sscanf(line + 2 * i, "%2x", &v);
            data[i] = (unsigned char)v;
        }
        uint8_t d[32];
        sha256(data, n, d);
        for (int i = 0; i < 32; i++)
            printf("%02x", d[i]);
        printf("\n");
    }
    return 0;
}
