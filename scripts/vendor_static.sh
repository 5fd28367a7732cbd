#!/usr/bin/env bash
# Refresh the JavaScript the book needs offline, from the npm registry, at pinned versions.
#
#   scripts/vendor_static.sh          # re-download and overwrite book/_static/vendor/
#   scripts/vendor_static.sh --check  # verify the committed files against SHA256SUMS
#
# What is vendored, and why (only the files a rendered page loads):
#   requirejs                    require.js                    AMD loader the widget bundle needs
#   @jupyter-widgets/html-manager dist/embed-amd.js + woff2     renders saved ipywidgets state (ipywidgets 8 = html-manager 1.x)
#   mathjax (v3)                 es5/tex-mml-chtml.js + CHTML  typesets the maths; fonts are loaded relative to the script
#                                woff-v2 fonts + a few TeX
#                                extensions loaded on demand
# _config.yml points Sphinx (mathjax_path) and myst-nb (nb_ipywidgets_js) at these files,
# so the built HTML references no CDN. The vendored tree lives in book/_static/, not in a
# root _static/: Jupyter Book 1 injects *every* .js under a root _static/ into every page.
set -euo pipefail

REQUIREJS=2.3.8
HTML_MANAGER=1.0.15
MATHJAX=3.2.2
TEX_EXTENSIONS="boldsymbol color cancel mathtools textmacros"   # autoloaded by \boldsymbol, \color, ...

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/book/_static/vendor"

if [[ "${1:-}" == "--check" ]]; then
    cd "$dest" && sha256sum --quiet -c SHA256SUMS && echo "vendored files OK"
    exit
fi

command -v npm >/dev/null || { echo "npm is needed (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent "requirejs@$REQUIREJS" "@jupyter-widgets/html-manager@$HTML_MANAGER" "mathjax@$MATHJAX" >/dev/null
for pkg in requirejs @jupyter-widgets/html-manager mathjax; do
    name=${pkg#@}; name=${name//\//-}
    mkdir -p "x/$pkg"
    tar xzf "$name"-*.tgz -C "x/$pkg" --strip-components=1
done

rm -rf "$dest"
mkdir -p "$dest/html-manager" "$dest/mathjax/output/chtml/fonts/woff-v2" "$dest/mathjax/input/tex/extensions"

cp x/requirejs/require.js "$dest/require.js"

hm=x/@jupyter-widgets/html-manager
cp "$hm/dist/embed-amd.js" "$hm/dist/"*.woff2 "$hm/dist/embed.js.LICENSE.txt" "$dest/html-manager/"
cp "$hm/LICENSE" "$dest/html-manager/LICENSE" 2>/dev/null || true

mj=x/mathjax/es5
cp "$mj/tex-mml-chtml.js" "$dest/mathjax/"
cp "$mj/output/chtml/fonts/woff-v2/"*.woff "$dest/mathjax/output/chtml/fonts/woff-v2/"
for ext in $TEX_EXTENSIONS; do
    cp "$mj/input/tex/extensions/$ext.js" "$dest/mathjax/input/tex/extensions/"
done
cp x/mathjax/LICENSE "$dest/mathjax/LICENSE"

cat > "$dest/VERSIONS" <<VERS
requirejs $REQUIREJS
@jupyter-widgets/html-manager $HTML_MANAGER
mathjax $MATHJAX
VERS
(cd "$dest" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
du -sh "$dest"
