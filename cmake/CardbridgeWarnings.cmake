# cardbridge_target_defaults(<target>): warnings and sanitizers for our own targets only.
function(cardbridge_target_defaults target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
      -Wold-style-cast -Wcast-align -Wconversion -Wsign-conversion
      -Wno-missing-field-initializers>)
  if(CARDBRIDGE_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(CARDBRIDGE_SANITIZERS)
    target_compile_options(${target} PRIVATE -fsanitize=${CARDBRIDGE_SANITIZERS} -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=${CARDBRIDGE_SANITIZERS})
  endif()
endfunction()
