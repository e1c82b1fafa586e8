// A main() for replaying a fuzz target without libFuzzer (gcc, -fsanitize=address,undefined):
// runs LLVMFuzzerTestOneInput once on each file named, or each file of each directory named.
// A finding aborts (the target's own check, or a sanitizer's report).
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

static int run_file(const char * path) {
    FILE * f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t * data = malloc(size > 0 ? (size_t) size : 1);
    if (data == NULL || fread(data, 1, (size_t) size, f) != (size_t) size) {
        fprintf(stderr, "%s: cannot read\n", path);
        return 1;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(data, (size_t) size);
    free(data);
    return 0;
}

int main(int argc, char ** argv) {
    int runs = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            perror(argv[i]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            if (run_file(argv[i]) != 0) {
                return 1;
            }
            runs++;
            continue;
        }
        DIR * dir = opendir(argv[i]);
        struct dirent * entry;
        while (dir != NULL && (entry = readdir(dir)) != NULL) {
            if (entry->d_name[0] == '.') {
                continue;
            }
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[i], entry->d_name);
            if (run_file(path) != 0) {
                return 1;
            }
            runs++;
        }
        if (dir != NULL) {
            closedir(dir);
        }
    }
    printf("replayed %d inputs\n", runs);
    return 0;
}
