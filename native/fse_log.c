// llama.cpp log routing: quiet by default, last error kept for a one-line report.
#include "fse.h"

#include <stdio.h>
#include <string.h>

#include "llama.h"

static int  log_verbose;
static int  log_in_error;     // the previous fragment was an error (CONT lines extend it)
static char log_error[1024];  // the last error message, without its trailing newline

static void log_callback(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (log_verbose) {
        fputs(text, stderr);
    }
    const int continues = level == GGML_LOG_LEVEL_CONT && log_in_error;
    if (level == GGML_LOG_LEVEL_ERROR || continues) {
        // Consecutive errors form one report: llama.cpp says why first ("tensor
        // data is not within the file bounds") and only then "failed to load".
        if (!log_in_error) {
            log_error[0] = '\0';
        } else if (!continues) {
            strncat(log_error, "; ", sizeof(log_error) - strlen(log_error) - 1);
        }
        strncat(log_error, text, sizeof(log_error) - strlen(log_error) - 1);
        size_t len = strlen(log_error);
        while (len > 0 && (log_error[len - 1] == '\n' || log_error[len - 1] == ' ')) {
            log_error[--len] = '\0';
        }
        log_in_error = 1;
    } else if (level != GGML_LOG_LEVEL_CONT) {
        log_in_error = 0;
    }
}

void fse_log_install(int verbose) {
    log_verbose = verbose;
    llama_log_set(log_callback, NULL);
}

const char * fse_log_last_error(void) {
    return log_error;
}
