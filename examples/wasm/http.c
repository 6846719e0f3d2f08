/* An HTTP-mode WASI command: prints a JSON result object, so it sets the
 * status, headers and HTML body itself. The body is base64-encoded, as the
 * result format requires. Build: ./build.sh */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put_base64(const unsigned char *s, size_t n) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = s[i] << 16 | (i + 1 < n ? s[i + 1] << 8 : 0) | (i + 2 < n ? s[i + 2] : 0);
        putchar(abc[v >> 18 & 63]);
        putchar(abc[v >> 12 & 63]);
        putchar(i + 1 < n ? abc[v >> 6 & 63] : '=');
        putchar(i + 2 < n ? abc[v & 63] : '=');
    }
}

int main(void) {
    const char *method = getenv("METHOD");
    const char *url = getenv("URL");
    char body[1024];
    snprintf(body, sizeof body, "<h1>Hello from WASM</h1><p>%s %s</p>",
             method && *method ? method : "GET", url && *url ? url : "/");
    printf("{\"http_code\": 200, \"error\": \"\", \"is_html\": true, "
           "\"http_headers\": {\"Content-Type\": \"text/html\", \"X-Powered-By\": \"wasm\"}, \"payload\": \"");
    put_base64((const unsigned char *)body, strlen(body));
    printf("\"}\n");
    return 0;
}
