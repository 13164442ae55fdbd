/* Plain C against the installed package: prints the version, then loads the export folder
 * given as argv[1] (if any) and reports its sizes or the error. */
#include <stdio.h>

#include "flamingo_rt/flamingo_rt.h"

int main(int argc, char** argv) {
  printf("flamingo_rt %s\n", flamingo_version());
  if (argc < 2) return 0;
  flamingo_model* model = NULL;
  flamingo_status st = flamingo_model_load(argv[1], NULL, &model);
  if (st != FLAMINGO_OK) {
    fprintf(stderr, "%s: %s\n", flamingo_status_string(st), flamingo_last_error());
    return (int)st;
  }
  printf("max_seq_len %d, max_media %d, image_size %d\n", flamingo_model_max_seq_len(model),
         flamingo_model_max_media(model), flamingo_model_image_size(model));
  flamingo_model_free(model);
  return 0;
}
