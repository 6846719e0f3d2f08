/* A WASI command for msgscript: greets whoever sent the payload.
 * The payload arrives on stdin (and in $PAYLOAD); whatever is printed on
 * stdout is the result. Build: ./build.sh */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    static char payload[65536];
    size_t n = fread(payload, 1, sizeof payload - 1, stdin);
    payload[n] = '\0';
    const char *subject = getenv("SUBJECT");
    printf("Hello, %s! (subject %s)", n ? payload : "world", subject ? subject : "?");
    return 0;
}
