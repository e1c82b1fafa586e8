#!/bin/sh
# guarded-generate-java: the Java client's example (clients/java), run from its shaded jar.
# Installed into clients/bin by `make -C clients/java build`.
set -e
here=$(cd "$(dirname "$0")" && pwd)
jar="$here/../java/target/libfse-client-all.jar"
if [ ! -f "$jar" ]; then
  echo "guarded-generate: error: $jar is missing; run 'make -C clients/java build'" >&2
  exit 1
fi
# Java decodes argv with the locale's charset: under C/POSIX a UTF-8 prompt would arrive as '?'.
case "${LC_ALL:-${LC_CTYPE:-${LANG:-}}}" in
  *[Uu][Tt][Ff]-8* | *[Uu][Tt][Ff]8*) ;;
  *) LC_ALL=C.UTF-8; export LC_ALL ;;
esac
java=java
[ -n "$JAVA_HOME" ] && java="$JAVA_HOME/bin/java"
# A short-lived CLI: C1 only and the serial GC start fastest.
exec "$java" -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:-UsePerfData -jar "$jar" "$@"
