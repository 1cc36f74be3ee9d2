/* Built without hardening on purpose (tests/hardening/CMakeLists.txt): the hardening check
   must refuse it. A local array and a copy into it give the stack protector and FORTIFY
   something to act on had they been on. */
#include <stdio.h>
#include <string.h>

int main(int argc, char** argv) {
  char buf[64];
  strcpy(buf, argc > 1 ? argv[1] : "probe");
  printf("%s\n", buf);
  return 0;
}
