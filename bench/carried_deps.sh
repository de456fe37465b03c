# Sourced by the device scripts: unpacks the Debian packages the device image lacks, carried in
# build-debs/ (see bench/serve_bench.sh for the list), and points pkg-config, CMake and the loader
# at them.
if ls build-debs/*.deb >/dev/null 2>&1; then
  D=/tmp/kiln-deps
  for f in build-debs/*.deb; do dpkg -x "$f" "$D"; done
  sed -i "s|^prefix=.*|prefix=$D/usr|" "$D"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc \
    "$D"/usr/share/pkgconfig/*.pc 2>/dev/null
  find "$D" -type l -lname '/*' | while read -r l; do ln -sf "$D$(readlink "$l")" "$l"; done
  export PKG_CONFIG_PATH=$D/usr/lib/x86_64-linux-gnu/pkgconfig:$D/usr/share/pkgconfig
  export CMAKE_PREFIX_PATH=$D/usr
  export LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:$D/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
