/* flamingo_rt's C API: few-shot visual question answering and captioning in C and C++ hosts,
 * with no Python at run time.
 *
 * A model is a folder written by `flamingo-rt export MODEL_DIR OUT_DIR`: AOTInductor packages
 * (media encoder, token step), tokenizer.json and manifest.json. The host links
 * libflamingo_rt (which brings our kernels and registers our torch ops) and libtorch.
 *
 *   flamingo_model* model = NULL;
 *   flamingo_model_params mp = flamingo_model_default_params();
 *   if (flamingo_model_load("exported/", &mp, &model) != FLAMINGO_OK) {
 *     fprintf(stderr, "%s\n", flamingo_last_error());
 *     return 1;
 *   }
 *   flamingo_session* s = NULL;
 *   flamingo_session_create(model, &s);
 *   flamingo_session_append_image_rgb8(s, pixels, width, height);     // RGB, row-major HWC
 *   flamingo_session_append_text(s, "a red circle.<|endofchunk|>");
 *   flamingo_session_append_image_rgb8(s, pixels2, width2, height2);
 *   flamingo_session_append_text(s, "a");
 *   flamingo_generate_params gp = flamingo_generate_default_params();   // greedy, 32 tokens
 *   flamingo_session_generate(s, &gp, on_piece, NULL, NULL);            // streams whole UTF-8 characters
 *   flamingo_session_free(s);
 *   flamingo_model_free(model);
 *
 * Rules: every function returns a flamingo_status (or a plain value that cannot fail);
 * FLAMINGO_OK is 0. On an error, flamingo_last_error() (per thread) says what was expected and
 * what was received. No C++ exception crosses this API. Every handle is freed by its *_free
 * function (NULL is accepted and ignored). A model may be shared by sessions on several
 * threads; one session must not be used by two threads at once.
 */
#ifndef FLAMINGO_RT_H_
#define FLAMINGO_RT_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FLAMINGO_API __declspec(dllexport)
#else
#define FLAMINGO_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum flamingo_status {
  FLAMINGO_OK = 0,
  FLAMINGO_ERR_INVALID_ARGUMENT = 1, /* NULL handle, bad size, bad parameter value */
  FLAMINGO_ERR_IO = 2,               /* a file is missing or cannot be read */
  FLAMINGO_ERR_FORMAT = 3,           /* a package, manifest or tokenizer.json is corrupted or unsupported */
  FLAMINGO_ERR_CAPACITY = 4,         /* the prompt or the media do not fit the session's caches */
  FLAMINGO_ERR_RUNTIME = 5           /* the model failed while running (message from torch) */
} flamingo_status;

/* The last error message of the calling thread ("" when none). Valid until the next call. */
FLAMINGO_API const char* flamingo_last_error(void);
/* A short name of a status ("ok", "invalid argument", ...). */
FLAMINGO_API const char* flamingo_status_string(flamingo_status status);
/* The library version, "MAJOR.MINOR.PATCH". */
FLAMINGO_API const char* flamingo_version(void);

/* ------------------------------------------------------------------------------- models */

typedef struct flamingo_model flamingo_model;

typedef struct flamingo_model_params {
  int num_threads; /* intra-op threads; 0 keeps libtorch's default */
  int warmup;      /* nonzero (default): run each package once at load on placeholder inputs, so
                      the first prompt does not pay first-call costs (the weights' first touch,
                      allocations, threads starting); 0: load only */
} flamingo_model_params;

FLAMINGO_API flamingo_model_params flamingo_model_default_params(void);

/* Load an export folder. `params` may be NULL (defaults). On success *out is a new model. */
FLAMINGO_API flamingo_status flamingo_model_load(const char* folder, const flamingo_model_params* params,
                                                 flamingo_model** out);
FLAMINGO_API void flamingo_model_free(flamingo_model* model);

/* Sizes from the manifest (0 for a NULL model). */
FLAMINGO_API int flamingo_model_max_seq_len(const flamingo_model* model);
FLAMINGO_API int flamingo_model_max_media(const flamingo_model* model);
FLAMINGO_API int flamingo_model_max_frames(const flamingo_model* model);
FLAMINGO_API int flamingo_model_image_size(const flamingo_model* model);

/* Tokenizer access (for hosts that count or inspect tokens). `out_ids` may be NULL to ask
 * for the count only; *n_ids receives the number of ids, at most `capacity` are written. */
FLAMINGO_API flamingo_status flamingo_tokenize(const flamingo_model* model, const char* utf8, int32_t* out_ids,
                                               size_t capacity, size_t* n_ids);

/* ----------------------------------------------------------------------------- sessions */

typedef struct flamingo_session flamingo_session;

/* A conversation with its own caches (max_seq_len tokens, max_media media). */
FLAMINGO_API flamingo_status flamingo_session_create(flamingo_model* model, flamingo_session** out);
FLAMINGO_API void flamingo_session_free(flamingo_session* session);
/* Run the queued media and tokens through the model now (generate and score do it otherwise);
 * nothing to do when none are queued. A run that fails leaves them queued. With flamingo_session_fork: prefill a few-shot support set once, then fork a
 * session per query, so the support set is computed once. */
FLAMINGO_API flamingo_status flamingo_session_prefill(flamingo_session* session);
/* A new session holding a copy of `session`'s context (its caches, queued tokens and media);
 * the two are independent afterwards. On success *out is a new session (free it with
 * flamingo_session_free). */
FLAMINGO_API flamingo_status flamingo_session_fork(const flamingo_session* session, flamingo_session** out);
/* Forget everything appended and generated (the caches are kept). */
FLAMINGO_API flamingo_status flamingo_session_reset(flamingo_session* session);
/* Tokens in the context so far (appended, generated, and pending). */
FLAMINGO_API int flamingo_session_num_tokens(const flamingo_session* session);

/* Append UTF-8 text; special tokens written in it (<|endofchunk|>, <|endoftext|>) become their
 * ids (<image> is refused: append media with append_image_* / append_clip_*). Text is tokenized
 * and queued; it runs through the model at the next generate. FLAMINGO_ERR_CAPACITY when its
 * tokens do not fit the context left (max_seq_len minus num_tokens); a refused append (of
 * text or media, for any reason) leaves the session as it was. */
FLAMINGO_API flamingo_status flamingo_session_append_text(flamingo_session* session, const char* utf8);

/* Append an image: it is checked and preprocessed now, an <image> token is queued at this
 * place of the text, and it is encoded (vision encoder, resampler, cross-attention keys and
 * values) at the next run of the model (prefill, generate, score) together with every medium
 * appended since the last run: the images of a few-shot prompt go through the vision encoder
 * in one batch. An error of the encoder itself is reported by that run.
 *  - rgb8: `height` rows of `width` RGB pixels, row-major, 3 bytes per pixel, no padding;
 *  - f32:  planar (3, height, width) floats in [0, 1] (NaN, infinities and values outside
 *          [0, 1] by more than 1e-3, such as a 0-255 image, are refused).
 * FLAMINGO_ERR_CAPACITY when the session holds max_media media, or its context is full.
 * Any size is accepted: it is resized (bilinear, antialiased) to the model's image size. */
FLAMINGO_API flamingo_status flamingo_session_append_image_rgb8(flamingo_session* session, const uint8_t* rgb,
                                                                int width, int height);
FLAMINGO_API flamingo_status flamingo_session_append_image_f32(flamingo_session* session, const float* chw,
                                                               int width, int height);
/* Append a clip of `frames` RGB8 frames (each as for append_image_rgb8, back to back);
 * 1 <= frames <= flamingo_model_max_frames(). */
FLAMINGO_API flamingo_status flamingo_session_append_clip_rgb8(flamingo_session* session, const uint8_t* rgb,
                                                               int frames, int width, int height);

/* --------------------------------------------------------------------------- generation */

/* Receives each new piece of text (whole UTF-8 characters, not NUL-terminated: use len).
 * Return 0 to continue, nonzero to stop the generation (flamingo_session_generate then
 * returns FLAMINGO_OK with *stopped_by_callback set). */
typedef int (*flamingo_piece_callback)(const char* piece, size_t len, void* user_data);

typedef struct flamingo_generate_params {
  int max_new_tokens;              /* >= 1; default 32 */
  float temperature;               /* 0: greedy (default); > 0: sampling */
  int top_k;                       /* 0: off */
  float top_p;                     /* 1: off; (0, 1]: nucleus sampling */
  uint64_t seed;                   /* sampling seed */
  int stop_at_endofchunk;          /* nonzero (default): stop at <|endofchunk|> */
  int stop_at_endoftext;           /* nonzero (default): stop at <|endoftext|> */
  const char* const* stop_strings; /* optional: stop when the text contains one of these */
  int num_stop_strings;
  int num_beams;                   /* 1 (default): greedy or sampling; K > 1: beam search (temperature 0) */
  float length_penalty;            /* beam search: hypotheses rank by sum(logprob) / length ** it; default 1 */
  int early_stopping;              /* beam search ends: 0 (default) when no live beam can beat the worst of
                                      the K finished at its current length (Hugging Face's default and
                                      open_flamingo's), 1 at K finished, 2 at any length it could reach */
} flamingo_generate_params;

FLAMINGO_API flamingo_generate_params flamingo_generate_default_params(void);

typedef struct flamingo_generate_result {
  int num_tokens;          /* tokens generated (the stop token excluded) */
  int stopped_by_callback; /* the callback asked to stop */
  int hit_stop;            /* stopped by <|endofchunk|>, <|endoftext|> or a stop string */
  double prefill_seconds;  /* the queued media and tokens through the model, until the first token */
  double decode_seconds;   /* the rest */
} flamingo_generate_result;

/* Run the queued prompt, then generate (as the Python runtime, <image> and <pad> are never
 * generated). The answer stays in the session's context (the
 * conversation can continue with more appends). `callback` and `result` may be NULL.
 * With num_beams = K > 1: beam search as the Python runtime's generate(num_beams=K) (Hugging
 * Face's rules, open_flamingo's answers): K rows copied from the session's caches decode a
 * token each per step, all in one call (K <= the export's max_beams, `flamingo-rt export
 * --max-beams`); the answer (cut at a stop string) comes to the callback in one piece at the end;
 * its tokens (a stop token that ended it included) are queued in the context and run at the
 * next generate or prefill. It decodes at most max_seq_len - num_tokens tokens. */
FLAMINGO_API flamingo_status flamingo_session_generate(flamingo_session* session,
                                                       const flamingo_generate_params* params,
                                                       flamingo_piece_callback callback, void* user_data,
                                                       flamingo_generate_result* result);

/* ------------------------------------------------------------------------------ scoring */

/* The log-likelihood (sum of the tokens' natural-log probabilities, float32 log-softmax of the
 * raw logits, as the Python runtime's Generator.score) of each candidate continuation after the
 * session's context: out_logprobs[i] for candidates[i]. Few-shot classification ranks class
 * names this way. The queued tokens run first; the session's context is unchanged afterwards
 * (the candidates, less their last token, run packed past its end in one run of the export's
 * score step per 256 tokens, each seeing the context and itself only, and are forgotten; an
 * export made without a score step runs them one token at a time). Candidates must be
 * non-empty, without <image>, and fit the context left: 1 + num_tokens + their length - 1 <=
 * max_seq_len, else FLAMINGO_ERR_CAPACITY. */
FLAMINGO_API flamingo_status flamingo_session_score(flamingo_session* session, const char* const* candidates,
                                                    int num_candidates, double* out_logprobs);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLAMINGO_RT_H_ */
