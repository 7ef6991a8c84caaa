#!/bin/sh
# Render /etc/nginx/templates/**/*.template into /etc/nginx/conf.d/ (the same relative
# path, suffix dropped) with envsubst, as the official image does: only variables set in
# the environment are substituted, so nginx's own $variables stay as they are.
set -e
templates="${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}"
suffix="${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}"
output="${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}"
[ -d "$templates" ] || exit 0
defined="$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')"
find "$templates" -follow -type f -name "*$suffix" | while read -r template; do
  relative="${template#"$templates/"}"
  target="$output/${relative%"$suffix"}"
  mkdir -p "$(dirname "$target")"
  echo "$0: rendering $template into $target"
  envsubst "$defined" <"$template" >"$target"
done
